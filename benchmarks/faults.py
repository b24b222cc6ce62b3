"""Kill/resume campaign: kill -9 every process of a stage at random moments, rerun, compare with an
uninterrupted run.

    python benchmarks/faults.py                                  # 20 kills per stage, every stage
    python benchmarks/faults.py --stages teacher --cycles 1 --seed 9 --after-progress \
        --set teacher.ds_config=zero2.json                       # the short version the tests run

One uninterrupted reference run of the tiny pipeline first (teacher -> soft_labels -> distill ->
contrastive, 2 ranks, run.trace_samples on). Then, per stage, rounds: a copy of the reference run
without that stage's output (and what follows it), the stage's command started and its whole process
group SIGKILLed after a random delay in [0, the reference stage's wall time] (--after-progress: from the
moment the run has a checkpoint or a soft-label rank manifest, in [0, the time the reference ran after its
first]), again and again until a run is not killed and finishes; each kill is a cycle. A round ends when
the stage has finished, and is compared with the reference:
- training stages: the sample trace (logs/samples/<stage>.r*.tsv, the last attempt's record of each
  step and micro-batch) must equal the reference's: samples lost = in the reference and not here,
  repeated = here more often than there; every train/loss in TensorBoard within --rtol of the reference;
- soft_labels: every shard of the soft labels and of the candidate groups identical (name, metadata and
  arrays bit for bit), and the row hashes of both in manifest order equal (lost/repeated from those rows).
A kill "during save" found a checkpoint tag not yet named by complete.json, or a temp file of a shard or
manifest. Prints a table and writes JSON (--json); exits 1 if any round lost, repeated or deviated.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors import safe_open

from stablekd.launcher.config import load_config
from stablekd.launcher.driver.data_order import in_progress
from stablekd.launcher.rank.monitor import read_scalars
from stablekd.launcher.stages import NAMES, spec

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "configs" / "quickstart.yaml"
STAGES = ["teacher", "soft_labels", "distill", "contrastive"]
# The tiny pipeline of the tests (tests/conftest.py UPSTREAM, the distill and contrastive tests), with
# more steps and sequences so that a random kill lands in the middle of the work. (The teacher's steps take
# ~0.03 s here: its stage is ~16 s of start-up and ~1.5 s of training, so most random kills hit start-up.)
OVERRIDES = [
    "teacher.model=tiny", "data.bios.people=20", "data.bios.unseen_people=4", "tokenizer.vocab_size=400",
    "data.seq_len=32", "launch.nproc_per_node=2", "run.trace_samples=true",
    "teacher.micro_batch_size=4", "teacher.max_steps=48", "teacher.save_every=2", "teacher.warmup_steps=2",
    "teacher.log_every=1", "teacher.eval_every=0", "teacher.eval_batches=2", "teacher.export_hf=false",
    "teacher.dtype=fp32",
    "soft_labels.k=8", "soft_labels.temperature=2.0", "soft_labels.max_sequences=48",
    "soft_labels.records_per_shard=2", "soft_labels.micro_batch_size=2", "soft_labels.candidate_contexts=16",
    "soft_labels.candidates_per_context=2", "soft_labels.generate_batch_size=4",
    "soft_labels.max_new_tokens=8",
    "student.model=tiny-student", "distill.dtype=fp32", "distill.max_steps=24", "distill.micro_batch_size=2",
    "distill.temperature=2.0", "distill.save_every=2", "distill.log_every=1", "distill.eval_every=0",
    "distill.eval_batches=1", "distill.warmup_steps=2",
    "contrastive.dtype=fp32", "contrastive.max_steps=16", "contrastive.micro_batch_size=2",
    "contrastive.negatives=3", "contrastive.save_every=2", "contrastive.log_every=1",
    "contrastive.eval_every=0", "contrastive.eval_batches=1", "contrastive.warmup_steps=2",
]  # fmt: skip


def command(run: Path, stage: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "stablekd.launcher.driver.cli", "stage", stage, str(QUICKSTART),
            f"run.out_dir={run}", *OVERRIDES, *extra]  # fmt: skip


def progress_check(run: Path, stage: str, extra: list[str]) -> Callable[[], bool]:
    """Whether `command(run, stage, extra)` has progress a rerun resumes from (a complete checkpoint, a
    soft-label rank manifest) and has not finished: the rule a resume is judged by (data_order.in_progress)."""
    cfg = load_config(QUICKSTART, [f"run.out_dir={run}", *OVERRIDES, *extra])
    return lambda: in_progress(cfg, stage)


def run_stage(run: Path, stage: str, extra: list[str]) -> tuple[float, float]:
    """Run `stage` to its end: its wall time, and when it first had progress to resume from (its wall time
    if never). Raises with the output's tail if it fails."""
    t0, first, progressed = time.perf_counter(), None, progress_check(run, stage, extra)
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(command(run, stage, extra), cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if first is None and progressed():
                first = time.perf_counter() - t0
            time.sleep(0.02)
        if proc.returncode != 0:
            out.seek(0)
            tail = out.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"{stage} failed (exit {proc.returncode}):\n{tail}")
    wall = time.perf_counter() - t0
    return wall, wall if first is None else first


def saving(run: Path, stage: str) -> bool:
    """A save is under way: a checkpoint tag complete.json does not name, or a temp file being written."""
    out = run / spec(stage).out_dir
    ckpt = out / "ckpt"
    if (ckpt / "complete.json").exists():
        named = json.loads((ckpt / "complete.json").read_text())["tag"]
        if any(p.name > named for p in ckpt.glob("step*")):
            return True
    return any(out.rglob("*.tmp"))


def checkpoint_step(run: Path, stage: str) -> int:
    """The step of the stage's last complete checkpoint (what a rerun resumes from); 0 if none."""
    marker = run / spec(stage).out_dir / "ckpt" / "complete.json"
    return json.loads(marker.read_text())["step"] if marker.exists() else 0


def trace(run: Path, stage: str) -> list[str]:
    """The samples of the run's steps: per rank, the last attempt's digest of each (step, micro-batch)."""
    out = []
    for f in sorted((run / "logs" / "samples").glob(f"{stage}.r*.tsv")):
        last: dict[tuple[int, int], str] = {}
        for line in f.read_text().splitlines():
            step, micro, digest = line.split("\t")
            last[(int(step), int(micro))] = digest
        out += [f"{f.stem}:{last[k]}" for k in sorted(last)]
    return out


def shard_rows(run: Path) -> tuple[list[str], list[str]]:
    """(digest of every shard's contents, hash of every row) of soft_labels/ and its candidates/, in
    manifest order. A shard's digest covers its name, metadata and arrays, not its bytes: safetensors
    writes the metadata keys in a per-process random order, so equal shards differ in sha256."""
    shards, rows = [], []
    for d in (run / "soft_labels", run / "soft_labels" / "candidates"):
        for entry in json.loads((d / "manifest.json").read_text())["shards"]:
            with safe_open(str(d / entry["file"]), "np") as f:
                meta = sorted(f.metadata().items())
                arrays = {k: f.get_tensor(k) for k in sorted(f.keys())}
            h = hashlib.sha256(f"{d.name}/{entry['file']}{meta}".encode())
            for k, a in arrays.items():
                h.update(k.encode() + str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())
            shards.append(h.hexdigest())
            n = len(next(iter(arrays.values())))
            rows += [
                hashlib.sha256(
                    b"".join(np.ascontiguousarray(a[i]).tobytes() for a in arrays.values())
                ).hexdigest()
                for i in range(n)
            ]
    return shards, rows


def lost_repeated(want: list[str], got: list[str]) -> tuple[int, int]:
    w, g = Counter(want), Counter(got)
    return sum((w - g).values()), sum((g - w).values())


def compare(ref: Path, run: Path, stage: str, rtol: float) -> dict:
    if stage == "soft_labels":
        ref_files, ref_rows = shard_rows(ref)
        files, rows = shard_rows(run)
        lost, repeated = lost_repeated(ref_rows, rows)
        return {"identical": files == ref_files, "lost": lost, "repeated": repeated, "max_loss_dev": 0.0}
    lost, repeated = lost_repeated(trace(ref, stage), trace(run, stage))
    want = read_scalars(ref / "tb" / stage, "train/loss")
    got = read_scalars(run / "tb" / stage, "train/loss")
    devs = [abs(got.get(s, float("inf")) - v) / abs(v) for s, v in want.items()]
    return {"identical": trace(ref, stage) == trace(run, stage), "lost": lost, "repeated": repeated,
            "max_loss_dev": max(devs)}  # fmt: skip


def fresh_copy(ref: Path, dst: Path, stage: str) -> None:
    """The reference run as it was before `stage` started: its directory and the later stages' removed."""
    shutil.copytree(ref, dst)
    for s in NAMES[NAMES.index(stage) :]:
        shutil.rmtree(dst / spec(s).out_dir, ignore_errors=True)
        shutil.rmtree(dst / "tb" / s, ignore_errors=True)
        for f in (dst / "logs" / "samples").glob(f"{s}.r*.tsv"):
            f.unlink()


def campaign(
    stage: str, ref: Path, wall: tuple[float, float], args: argparse.Namespace, rng: random.Random, work: Path
) -> dict:
    cycles, extra = args.cycles, args.set
    total, first = wall
    kills, during_save, rounds, resume_steps = 0, 0, [], []
    while kills < cycles:
        run = work / f"{stage}-round{len(rounds)}"
        fresh_copy(ref, run, stage)
        round_kills, progressed = 0, progress_check(run, stage, extra)
        while not (run / spec(stage).out_dir / "DONE.json").exists():
            if kills >= cycles:  # the last round: let it finish
                run_stage(run, stage, extra)
                break
            proc = subprocess.Popen(command(run, stage, extra), cwd=REPO, start_new_session=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            try:
                # --after-progress: from the run's first checkpoint on, as long as the reference's lasted
                while args.after_progress and proc.poll() is None and not progressed():
                    time.sleep(0.02)
                proc.wait(timeout=rng.uniform(0, total - first if args.after_progress else total))
            except subprocess.TimeoutExpired:
                during_save += saving(run, stage)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                resume_steps.append(checkpoint_step(run, stage))
                kills, round_kills = kills + 1, round_kills + 1
                continue
            if proc.returncode != 0:
                raise RuntimeError(f"{stage}: a run exited {proc.returncode} without being killed ({run})")
        rounds.append({"kills": round_kills, **compare(ref, run, stage, args.rtol)})
        shutil.rmtree(run)
    return {
        "stage": stage,
        "cycles": kills,
        "rounds": len(rounds),
        "kills_during_save": during_save,
        "resume_steps": resume_steps,  # per kill, the training step its rerun resumed from (0: none)
        "samples_lost": sum(r["lost"] for r in rounds),
        "samples_repeated": sum(r["repeated"] for r in rounds),
        "identical_rounds": sum(r["identical"] for r in rounds),
        "max_loss_dev": max(r["max_loss_dev"] for r in rounds),
        "ok": all(
            r["lost"] == r["repeated"] == 0 and r["identical"] and r["max_loss_dev"] <= args.rtol
            for r in rounds
        ),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated, of: " + ", ".join(STAGES))
    ap.add_argument("--cycles", type=int, default=20, help="kills per stage")
    ap.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance of each train/loss")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--after-progress", action="store_true",
                    help="kill only once the run has a checkpoint (or soft-label manifest) to resume from: at a "
                         "random moment of the time the reference ran after its first one")  # fmt: skip
    ap.add_argument("--json", default="runs/benchmarks/faults.json")
    ap.add_argument("--workdir", default="", help="where the runs go (default: a temp directory, removed)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every run, after the tiny pipeline's (repeatable)")  # fmt: skip
    args = ap.parse_args(argv)
    stages = args.stages.split(",")
    if unknown := set(stages) - set(STAGES):
        ap.error(f"--stages: unknown {', '.join(sorted(unknown))} (stages: {', '.join(STAGES)})")
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="stablekd-faults-"))
    try:
        ref = work / "reference"
        walls = {}
        for stage in STAGES[: max(STAGES.index(s) for s in stages) + 1]:
            walls[stage] = run_stage(ref, stage, args.set)
            print(
                f"reference {stage}: {walls[stage][0]:.1f}s (progress at {walls[stage][1]:.1f}s)", flush=True
            )
        rows = [campaign(s, ref, walls[s], args, rng, work) for s in stages]
        walls = {s: {"wall": w, "progress_at": f} for s, (w, f) in walls.items()}
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    head = ["stage", "cycles", "rounds", "kills during save", "samples lost", "samples repeated",
            "identical rounds", "max loss deviation"]  # fmt: skip
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print(f"| {r['stage']} | {r['cycles']} | {r['rounds']} | {r['kills_during_save']} | {r['samples_lost']} | "
              f"{r['samples_repeated']} | {r['identical_rounds']}/{r['rounds']} | {r['max_loss_dev']:.2e} |")  # fmt: skip
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"rtol": args.rtol, "seed": args.seed, "set": args.set, "stages": rows, "walls_s": walls},
            indent=2,
        )
    )
    print(f"-> {out}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
