"""Real 2-rank DeepSpeed teacher runs (gloo) through the `stablekd` CLI, checked against a plain PyTorch loop.

Tolerance: fp32 runs. Per step, ZeRO sums the two ranks' gradients (ZeRO-2 all-reduce, ZeRO-3
reduce-scatter) where the reference sums one batch: the same numbers added in another order, ~1e-7
relative per step. AdamW's update of tiny gradients magnifies that a little over steps, so the first 10
losses must agree to rtol 2e-4 (a wrong token count, data order, LR step or clipping moves them by >1e-2).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.lr_schedules import WarmupCosineLR

from stablekd.data_pipeline import bios
from stablekd.data_pipeline.stream import PackedStream, StreamLoader
from stablekd.data_pipeline.tokenizer import load_tokenizer
from stablekd.launcher.config import load_config
from stablekd.launcher.rank.monitor import read_scalars as tb_scalars
from stablekd.launcher.rundir import train_files
from stablekd.model.build import build_model
from stablekd.objectives.lm import nll_sum
from tests import early_launch
from tests.conftest import (
    QUICKSTART,
    REPO,
    TINY,
    copy_run,
    deepspeed_shm_buffers,
    run_group,
    run_stablekd,
)

pytestmark = pytest.mark.distributed
STEPS = 10  # 10 × 2 micro-batches × 4 × 32 tokens per rank: more than one pass over the user corpus


def reference_losses(run_dir: Path, steps: int, accum: int, lrs: list[float] | None = None) -> list[float]:
    """The same teacher trained in one plain process: both ranks' shards form each global batch. `lrs`
    gets the learning rate each step's update used."""
    cfg = load_config(run_dir / "config.yaml")
    t = cfg.teacher
    tok_dir = run_dir / "tokenizer"
    model = build_model(t.model, load_tokenizer(tok_dir), cfg.data.seq_len, cfg.run.seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=t.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=t.weight_decay
    )
    sched = WarmupCosineLR(
        opt,
        total_num_steps=t.max_steps,
        warmup_num_steps=t.warmup_steps,
        cos_min_ratio=t.min_lr_ratio,
        warmup_type="linear",
    )
    streams = [
        iter(
            StreamLoader(PackedStream(train_files(cfg), tok_dir, cfg.data.seq_len, t.micro_batch_size, r, 2))
        )
        for r in range(2)
    ]
    losses = []
    for _ in range(steps):
        batches = [next(s) for s in streams for _ in range(accum)]
        total, count = 0.0, 0
        opt.zero_grad()
        for b in batches:
            s, c = nll_sum(model(input_ids=b["input_ids"]).logits, b["labels"])
            s.backward()
            total, count = total + float(s.detach()), count + int(c)
        for p in model.parameters():
            p.grad /= count  # mean over every counted token of the global batch
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        if lrs is not None:
            lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        losses.append(total / count)
    return losses


def user_corpus(root: Path) -> Path:
    """A user's corpus: .txt with a bad-bytes line and empty lines, a .jsonl.gz with a broken record, an empty file."""
    texts = bios.generate(20, seed=3).train
    root.mkdir()
    (root / "a.txt").write_bytes("\n".join(texts[:20]).encode() + b"\n\n\xff\xfe broken bytes\n\n")
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts[20:40])
        f.write('{"text": unquoted}\n')
    (root / "empty.txt").write_text("")
    return root


@early_launch.fixture()
def zero3_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A 2-rank ZeRO-3 teacher on a user's corpus: its run directory and the command's arguments."""
    root = tmp_path_factory.mktemp("zero3")
    run = root / "z3"
    args = ["stage", "teacher", str(QUICKSTART), *TINY, f"run.out_dir={run}", "launch.nproc_per_node=2"]
    # One biography per line (data.text_unit=line); data.eval_fraction stays at its default 0.02, which
    # holds none of these 40 out (the stage then says it has no held-out text).
    args += [
        f"data.paths=[{user_corpus(root / 'corpus')}]",
        "data.text_unit=line",
        "teacher.ds_config=zero3.json",
        "teacher.dtype=fp32",
    ]
    args += [f"teacher.max_steps={STEPS}", "teacher.save_every=3", "teacher.grad_accum=2"]
    run_stablekd(*args)
    return run, args


def test_zero3_two_ranks_match_plain_pytorch(zero3_run):
    run, args = zero3_run
    # One ZeRO shard per rank, left sharded; a complete marker; DONE.json.
    ckpt = run / "teacher" / "ckpt"
    marker = json.loads((ckpt / "complete.json").read_text())
    assert marker["step"] == STEPS and marker["world_size"] == 2
    names = {p.name for p in (ckpt / marker["tag"]).iterdir()}
    assert {f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(2)} <= names
    assert len([n for n in names if n.endswith("optim_states.pt")]) == 2
    done = json.loads((run / "teacher" / "DONE.json").read_text())
    assert done["produced"]["zero_stage"] == 3 and done["produced"]["steps"] == STEPS
    # Bad bytes, a broken JSON record, empty lines and an empty file: skipped and counted, the run went on.
    # (The counts cover what the stream has read: here more than one whole pass.)
    stats = done["produced"]["data_stats"]
    assert (stats["files"], stats["documents"], stats["bad_lines"], stats["empty_files"]) == (3, 40, 2, 1)
    assert stats["empty_lines"] == 2 and stats["other_split"] == 0
    assert done["produced"]["eval_loss"] is None  # no held-out text: null, never NaN
    ds = json.loads((run / "ds" / "teacher.json").read_text())
    assert ds["train_batch_size"] == 4 * 2 * 2  # micro 4 × accum 2 × 2 ranks

    got = tb_scalars(run / "tb" / "teacher", "train/loss")
    want = reference_losses(run, STEPS, accum=2, lrs=(lrs := []))
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in range(1, STEPS + 1)] == pytest.approx(want, rel=2e-4)
    assert got[STEPS] < got[1]
    # the learning rate each step's update used (the scheduler has moved on after it)
    logged = tb_scalars(run / "tb" / "teacher", "train/lr")
    assert [logged[s] for s in range(1, STEPS + 1)] == pytest.approx(lrs, rel=1e-6) and len(set(lrs)) > 2
    for tag in ("train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/mfu", "perf/step_time_s"):
        assert tb_scalars(run / "tb" / "teacher", tag), f"{tag} missing from TensorBoard"

    # The driver skips a finished stage, and refuses to mix a changed config into a finished run.
    again = run_stablekd(*args)
    assert "teacher: done already" in again.stderr and "skipped" in again.stderr
    changed = run_stablekd(*args, "teacher.lr=0.1", check=False)
    assert (
        changed.returncode == 2 and "DONE.json: stage teacher finished with another config" in changed.stderr
    )


def test_zero2_random_kills_lose_and_repeat_nothing_and_match_plain_pytorch(no_early_launches, tmp_path):
    """The short version of the kill/resume campaign (benchmarks/faults.py) on ZeRO-2: an uninterrupted
    reference teacher run, then a kill -9 of the whole process group at a random moment of its training, rerun."""
    out, work = tmp_path / "faults.json", tmp_path / "runs"
    shm_before = deepspeed_shm_buffers()
    # --after-progress: the kill at a random moment after the run's first checkpoint (seed 9: at 46 % of the
    # time the reference ran after its first, mid-training). The tiny teacher's stage is mostly start-up
    # (its 48 steps and 24 saves take ~1.3 s of ~13 s): kills drawn over the whole wall time hit start-up,
    # or came after the run had finished, and tested no resume. No launch beside it, which would stretch
    # the reference's time or the killed run's.
    cmd = [sys.executable, "benchmarks/faults.py", "--stages", "teacher", "--cycles", "1", "--seed", "9",
           "--after-progress", "--json", str(out), "--workdir", str(work),
           "--set", "teacher.ds_config=zero2.json"]  # fmt: skip
    proc = run_group(cmd, 600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["stages"]
    assert row["stage"] == "teacher" and row["rounds"] >= 1
    assert row["resume_steps"][0] > 0  # killed after a checkpoint: the rerun resumed from it
    assert row["samples_lost"] == row["samples_repeated"] == 0
    assert row["identical_rounds"] == row["rounds"] and row["max_loss_dev"] <= 1e-5
    assert "| teacher | 1 |" in proc.stdout
    # The killed run equals the uninterrupted one (above), and that one is the curve plain PyTorch trains
    # (both ranks' shards in each global batch, as the 2-rank job reads them).
    ref = work / "reference"
    assert json.loads((ref / "ds" / "teacher.json").read_text())["zero_optimization"]["stage"] == 2
    got = tb_scalars(ref / "tb" / "teacher", "train/loss")
    assert [got[s] for s in range(1, 11)] == pytest.approx(reference_losses(ref, 10, 1), rel=2e-4)

    # A killed run resumed with another reading order would repeat or skip samples: refused before any rank
    # starts, by name (a copy of the reference without its DONE.json is a run killed after its last save).
    killed = copy_run(ref, tmp_path / "killed")
    (killed / "teacher" / "DONE.json").unlink()
    config = (killed / "config.yaml").read_text()
    refused = run_stablekd(
        "stage",
        "teacher",
        str(killed / "config.yaml"),
        f"run.out_dir={killed}",
        "data.num_workers=1",
        check=False,
    )
    assert refused.returncode == 2 and "data.num_workers: 0 then, 1 now" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert (killed / "config.yaml").read_text() == config  # nothing rewritten
    # Neither the finished, the killed nor the resumed runs left their ranks' 64 MiB buffers in /dev/shm,
    # nor loaded DeepSpeed's shared-memory op (a kill while it holds torch's build lock hangs every later
    # launch).
    assert deepspeed_shm_buffers() <= shm_before
    assert "shm_comm" not in (ref / "logs" / "teacher.log").read_text()
