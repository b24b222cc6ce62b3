"""Distillation: step cost of offline and online soft labels vs plain CE, and student quality at equal steps.

    python benchmarks/distill.py --run runs/quickstart [--steps 600] [--alpha 1.0] [--student student-s]

--run is a run directory with a finished teacher (teacher/ckpt/complete.json, teacher/hf) and soft
labels (soft_labels/manifest.json). It is never written: every arm trains in its own fresh directory
under a temp folder that links the run's config values, tokenizer/, data/ and soft_labels/ (the loop
puts checkpoints in <arm>/student/ckpt and TensorBoard in <arm>/tb/distill, so one arm per directory).

Arms, one process, DeepSpeed at world size 1 with the run's `distill.ds_config`, the same student preset
built from the same seed, the same micro batch (8 × 128 tokens per step in the quickstart), lr and schedule:
- `CE`: next-token cross-entropy (`lm_loss`) on the packed training stream, --steps steps;
- `KD offline`: the distill stage's loss (alpha · KD + (1 − alpha) · CE, `distill.kind` on the top-k + tail
  bins) on top-k soft labels read from soft_labels/ (`artifacts.open_soft_labels`, teacher None), --steps steps;
- `CE, SL seqs` (control, --no-control skips it): the stage's loss with alpha 0, i.e. next-token
  cross-entropy on exactly the sequences and order the KD arm reads. The soft labels are one pass of the
  corpus packed once, replayed identically every epoch, while the CE arm's looping stream packs each epoch
  at another offset; this row separates the effect of the objective from that of the data stream;
- `KD online`: the same loss on soft labels the ZeRO-3 teacher computes in this process
  (`artifacts.sharded_teacher`), --online-steps steps, timing only. The teacher's checkpoint was written by
  the run's ranks; at world size 1 it loads from a universal checkpoint, made once by `ds_to_universal`
  into the temp folder (the run's teacher/ckpt is only read). If that fails the arm is skipped, with why.
- `on-policy λ` (--on-policy 0.5,1): `distill.on_policy=λ` with the same sharded teacher loaded once:
  a share λ of the micro-batches are the student's own continuations of the first
  `distill.on_policy_prompt_tokens` tokens of the drawn records, scored by the teacher (data_pipeline/
  on_policy.py), the rest the offline soft labels; --steps steps, scored; and `on-policy λ @wall`, as many
  steps as the KD offline arm's wall time pays for (at its measured step time), scored too. Their step
  time is split into the student's sampling and the teacher's scoring per on-policy micro-batch.
Tokens per step are one micro batch of seq_len tokens, except the last batch of each soft-label epoch,
which holds the records left over (the table's tokens column counts what each arm read).

Step time: the median of the loop's own `perf/step_time_s` (logged every step; it includes drawing the
batch, i.e. reading shards or the online teacher's forward) over the steps after --warmup. Ratios KD/CE and
online/CE come from the same process on the same cores; the 1-minute load average before and after is
recorded, since other work on the cores skews every time.

Quality (CE, KD offline and the control, after --steps steps each): each student is exported to Hugging Face format
and loaded whole (fp32 on CPU, as the evaluate stage loads models), then held-out perplexity
(`report.held_out_scores` over the first `evaluate.ppl_batches` held-out batches of 8) and the bios probe on
trained people (`bios_probe.probe` with the run's `evaluate` settings and seed: accuracy of the greedy
answer, self-consistency and cross-sample contradiction over 1 + K answers, in-text contradiction of free
bios), and generation tokens/s on one fixed batch. The teacher's figures come from <run>/eval/report.json
when it exists, else from teacher/hf by the same code.

Goals: KD offline step / CE step <= 1.05; the KD student beats the CE student on held-out perplexity and
on bios accuracy; KD student bios accuracy >= 0.9 x the teacher's. Prints a table, writes
benchmarks/results/distill.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import operator
import os
import shutil
import tempfile
import time
from pathlib import Path

import provenance  # benchmarks/: this script's folder is on sys.path
import single_rank
import torch
from arms import (
    arm_config,
    device_dtype,
    median_or_none,
    on_policy_split,
    score,
    step_times,
    teacher_figures,
    train_arm,
    universal_teacher,
)
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from stablekd.data_pipeline import bios
from stablekd.data_pipeline.tokenizer import load_tokenizer
from stablekd.evaluation import report
from stablekd.evaluation.bios_probe import HFGenerator
from stablekd.launcher import models, rundir
from stablekd.launcher.rank import artifacts
from stablekd.model.build import export_hf

REPO = Path(__file__).resolve().parent.parent
GOAL_KD_OVER_CE = 1.05
GOAL_TEACHER_SHARE = 0.9
CONTROL = "CE, SL seqs"  # cross-entropy on the soft-label sequences (the stage's loss at alpha 0)


# --- main ----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--run", required=True, help="run directory with teacher/ckpt, teacher/hf and soft_labels/"
    )
    ap.add_argument("--steps", type=int, default=600, help="steps of the CE and KD offline arms")
    ap.add_argument(
        "--online-steps", type=int, default=0, help="steps of the online arm (0 = min(100, --steps))"
    )
    ap.add_argument(
        "--warmup", type=int, default=10, help="first steps of each arm left out of the step time"
    )
    ap.add_argument("--alpha", type=float, default=1.0, help="weight of KD (1 - alpha on CE)")
    ap.add_argument("--student", default="", help="student preset (default: the run's student.model)")
    ap.add_argument("--dtype", default="", help="auto, fp32 or bf16 (default: the run's distill.dtype)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = every core)")
    ap.add_argument("--no-online", action="store_true", help="skip the online teacher arm")
    ap.add_argument(
        "--on-policy", default="0.5,1", help="shares λ of the on-policy arms, comma-separated ('' = none)"
    )
    ap.add_argument("--no-control", action="store_true", help="skip CE on the soft-label sequences")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder of the arms")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "distill.json"))
    args = ap.parse_args()
    online_steps = args.online_steps or min(100, args.steps)
    if args.warmup >= min(args.steps, online_steps):
        ap.error(f"--warmup {args.warmup} leaves no timed step of {min(args.steps, online_steps)}")

    src = Path(args.run).resolve()
    for need in ("config.yaml", "soft_labels/manifest.json", "teacher/ckpt/complete.json"):
        if not (src / need).is_file():
            ap.error(f"{src / need} missing: --run needs a finished teacher and soft_labels stage")
    single_rank.start(29534, args.threads)
    hf_logging.disable_progress_bar()
    work = Path(tempfile.mkdtemp(prefix="stablekd_bench_distill_"))
    print(f"arms in {work}", flush=True)
    t_start, load_before = time.perf_counter(), os.getloadavg()[0]

    # (a) CE, (b) KD offline and the control: --steps each, then exported for scoring.
    arms: dict[str, dict] = {}
    exports: dict[str, Path] = {}
    plan = [("CE", "ce", "ce", None), ("KD offline", "kd", "kd", None)]
    if not args.no_control:
        plan.append((CONTROL, "kd", "control", 0.0))
    for name, kind, folder, alpha in plan:
        cfg = arm_config(src, work / folder, args, online=False, alpha=alpha)
        arm = train_arm(cfg, kind, args.steps)
        hf = cfg.run_dir / "student" / "hf"
        export_hf(arm["result"].engine.module, arm["tokenizer"], hf, arm["zero3"])
        exports[name] = hf
        arm["times"] = step_times(cfg, args.warmup)
        arms[name] = arm
        del arm["result"].engine
        gc.collect()

    # (c) KD online: timing only; (d) on-policy arms: scored, at equal steps and at equal wall time.
    shares = [float(x) for x in args.on_policy.split(",") if x.strip()]
    online_skip = "--no-online" if args.no_online and not shares else None
    if online_skip is None:
        cfg = arm_config(src, work / "online", args, online=True)
        online_skip = universal_teacher(src, cfg.run_dir)
        teacher = None
        if online_skip is None:
            try:
                teacher = artifacts.sharded_teacher(cfg)
            except Exception as e:  # noqa: BLE001  (the arm is optional: say why and go on)
                online_skip = f"the sharded teacher did not load at world size 1: {type(e).__name__}: {e}"
        if teacher is not None and not args.no_online:
            arm = train_arm(cfg, "kd", online_steps, teacher)
            arm["times"] = step_times(cfg, args.warmup)
            arm["teacher_tag"] = teacher.tag
            arms["KD online"] = arm
            del arm["result"].engine
            gc.collect()
        kd_step = median_or_none(arms["KD offline"]["times"])
        for share in shares if teacher is not None else []:
            for budget in ("steps", "wall"):
                name = f"on-policy {share:g}" + (" @wall" if budget == "wall" else "")
                steps = args.steps
                if budget == "wall":  # as many steps as the KD offline arm's wall time pays for
                    op = median_or_none(arms[f"on-policy {share:g}"]["times"])
                    steps = max(args.warmup + 1, round(args.steps * kd_step / op)) if op and kd_step else 0
                    if steps >= args.steps or not steps:
                        continue
                folder = f"on_policy_{share:g}_{budget}"
                cfg = arm_config(src, work / folder, args, online=False, extra=[f"distill.on_policy={share}"])
                arm = train_arm(cfg, "kd", steps, teacher)
                hf = cfg.run_dir / "student" / "hf"
                export_hf(arm["result"].engine.module, arm["tokenizer"], hf, arm["zero3"])
                exports[name] = hf
                arm["times"] = step_times(cfg, args.warmup)
                arm["split"] = on_policy_split(cfg)
                arms[name] = arm
                del arm["result"].engine
                gc.collect()
        del teacher
    if online_skip:
        print(f"KD online and on-policy arms skipped: {online_skip}", flush=True)

    # Quality: the same prompts, seeds and held-out batches for every model.
    base = arm_config(src, work / "score", args, online=False)
    people = bios.load_truth(src / "data" / "truth.json")[0] if not base.data.paths else []
    tok = load_tokenizer(models.tokenizer_dir(base))
    held = rundir.eval_files(base)
    prefixes = report.load_prefixes(
        held or rundir.train_files(base), tok, report.SPEED_BATCH, base.evaluate.prefix_tokens
    )
    speed_prompts = prefixes or ["The"]
    warm = AutoModelForCausalLM.from_pretrained(str(exports["CE"])).eval()  # lazy imports, kernel set-up
    with torch.inference_mode():
        HFGenerator(warm, tok)(speed_prompts[:2], 2, False, 4)
    del warm
    quality = {name: score(hf, base, people, speed_prompts) for name, hf in exports.items()}
    teacher_q, teacher_from = teacher_figures(src, base, people, speed_prompts)
    load_after = os.getloadavg()[0]

    # --- the table ---
    ce_med = median_or_none(arms["CE"]["times"])
    bf16 = arms["CE"]["bf16"]
    rows = []
    for name, arm in arms.items():
        med = median_or_none(arm["times"])
        q = quality.get(name, {})
        rows.append({
            "arm": name,
            "steps": arm["result"].steps,
            "tokens": arm["result"].tokens,
            "step_time_s": med,
            "timed_steps": len(arm["times"]),
            "vs_ce": med / ce_med if med and ce_med else None,
            "train_wall_s": arm["wall_s"],
            "load_average": arm["load_average"],
            "eval_loss": arm["result"].eval_loss,
            "final_train_loss": arm["result"].losses[-1] if arm["result"].losses else None,
            "params": arm["params"],
            "ppl": q.get("ppl"),
            "bios_accuracy": q.get("bios_accuracy"),
            "bios_self_consistency": q.get("bios_self_consistency"),
            "bios_cross_contradiction": q.get("bios_cross_contradiction"),
            "bios_intext_contradiction": q.get("bios_intext_contradiction"),
            "gen_tokens_per_s": q.get("gen_tokens_per_s"),
            **{f"on_policy_{k}": v for k, v in arm.get("split", {}).items()},
        })  # fmt: skip
    t_done = json.loads((src / "teacher" / "DONE.json").read_text())["produced"] if (
        src / "teacher" / "DONE.json").is_file() else {}  # fmt: skip
    if teacher_q:
        rows.append({
            "arm": "teacher",
            "steps": t_done.get("steps"),
            "tokens": t_done.get("tokens"),
            "params": teacher_q.get("params", t_done.get("params")),
            **{k: teacher_q.get(k) for k in ("ppl", "bios_accuracy", "bios_self_consistency",
                                             "bios_cross_contradiction", "bios_intext_contradiction",
                                             "gen_tokens_per_s")},
        })  # fmt: skip
    by = {r["arm"]: r for r in rows}
    ce, kd, tq = by["CE"], by["KD offline"], by.get("teacher", {})

    def cmp(a, b, op) -> bool | None:
        return None if a is None or b is None else op(a, b)

    goals = {
        f"KD offline step / CE step <= {GOAL_KD_OVER_CE}": cmp(kd["vs_ce"], GOAL_KD_OVER_CE, operator.le),
        "KD ppl < CE ppl": cmp(kd["ppl"], ce["ppl"], operator.lt),
        "KD bios accuracy > CE bios accuracy": cmp(kd["bios_accuracy"], ce["bios_accuracy"], operator.gt),
        f"KD bios accuracy >= {GOAL_TEACHER_SHARE} x teacher's": cmp(
            kd["bios_accuracy"],
            None if tq.get("bios_accuracy") is None else GOAL_TEACHER_SHARE * tq["bios_accuracy"],
            operator.ge,
        ),
    }
    # Informational: the objective alone, both students on the very sequences the soft labels cover.
    control = {}
    if CONTROL in by:
        c = by[CONTROL]
        control = {
            "KD ppl < CE-on-SL-seqs ppl": cmp(kd["ppl"], c["ppl"], operator.lt),
            "KD bios accuracy > CE-on-SL-seqs bios accuracy": cmp(
                kd["bios_accuracy"], c["bios_accuracy"], operator.gt
            ),
        }
    cfg0 = base  # the run's settings with this benchmark's overrides
    micro = cfg0.distill.micro_batch_size
    result = {
        **provenance.header(),
        "run": str(src),
        "student": cfg0.student.model,
        "seq_len": cfg0.data.seq_len,
        "micro_batch_size": micro,
        "lr": cfg0.distill.lr,
        "kind": cfg0.distill.kind,
        "alpha": args.alpha,
        "temperature": cfg0.distill.temperature,
        "k": cfg0.soft_labels.k,
        "dtype_path": "bf16" if bf16 else "fp32",
        "zero_stage": arms["CE"]["zero_stage"],
        "steps": args.steps,
        "online_steps": online_steps if "KD online" in arms else 0,
        "online_skipped": online_skip,
        "online_teacher_tag": arms["KD online"]["teacher_tag"] if "KD online" in arms else None,
        "warmup_steps": args.warmup,
        "threads": torch.get_num_threads(),
        "load_average": [load_before, load_after],
        "teacher_figures_from": teacher_from,
        "eval_settings": {
            "ppl_batches": cfg0.evaluate.ppl_batches,
            "ppl_micro_batch": report.PPL_MICRO_BATCH,
            "bios_questions": min(cfg0.evaluate.max_prompts, len(bios.ATTRIBUTES) * len(people)),
            "samples_per_question": cfg0.evaluate.samples,
            "free_bios": cfg0.evaluate.free_bios,
            "seed": cfg0.evaluate.seed,
            "eval_dtype": str(device_dtype()[1]).removeprefix("torch."),
        },
        "rows": rows,
        "goals": goals,
        "control": control,
        "seconds": round(time.perf_counter() - t_start, 1),
    }

    print(table(result))
    if online_skip:
        print(f"KD online: skipped ({online_skip})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out} ({result['seconds']:.0f}s)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def table(result: dict) -> str:
    """docs/results.md's table: one row per arm (step time = median after the warm-up steps; on-policy arms:
    mean seconds per on-policy micro-batch of the student's sampling and the teacher's scoring), the goals."""
    f = provenance.cell
    header = ["arm", "steps", "step s", "vs CE", "held-out ppl", "bios acc", "self-consistency", "contradiction",
              "gen tok/s", "sample s", "score s"]  # fmt: skip
    rows = [
        [r["arm"], f(r["steps"], "d"), f(r.get("step_time_s"), ".4f"), f(r.get("vs_ce"), ".3f"), f(r["ppl"], ".3f"),
         f(r["bios_accuracy"], ".3f"), f(r["bios_self_consistency"], ".3f"), f(r["bios_cross_contradiction"], ".3f"),
         f(r["gen_tokens_per_s"], ",.0f"), f(r.get("on_policy_generate_s"), ".4f"), f(r.get("on_policy_teacher_s"), ".4f")]
        for r in result["rows"]
    ]  # fmt: skip
    lines = [provenance.markdown_table(header, rows)]
    verdict = {True: "met", False: "MISSED", None: "n/a"}
    lines += ["", *(f"- {verdict[ok]}: {goal}" for goal, ok in result["goals"].items())]
    lines += [f"- control, {what}: {verdict[ok]}" for what, ok in result["control"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
