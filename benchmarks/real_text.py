"""The real-text proving ground, end to end: a teacher that models the King James Bible, measured on whole
held-out books beside the classical compressors, a student distilled from it and its CE-trained twin.

    apt-get install bible-kjv-text zstd                 # the text; zstd for its compressor row
    python benchmarks/real_text.py [--out runs/kjv]      # resumable: a finished phase is not redone

Phases (each skipped when its output is complete, so a killed benchmark reruns with the same command):
1. corpus: benchmarks/kjv_corpus.py into OUT/corpus (59 training books, 7 held out, the fact set);
2. pre-training: `stablekd run configs/kjv.yaml --stages teacher` on the training books' prose
   (OUT/pretrain, PRETRAIN overrides);
3. the teacher: that run continued on mixed.jsonl (prose + the training questions: configs/kjv.yaml,
   `teacher.init_from=OUT/pretrain`), then its soft labels (`--stages teacher,soft_labels`, OUT/teacher);
4. top-k soft labels of the same teacher and records (OUT/teacher_topk, `--stages soft_labels`; its teacher/
   links OUT/teacher's);
5. the students, on the very same soft-label records in the same order (benchmarks/arms.py: the distill
   stage's own assembly at world size 1, the same preset, seed, lr and schedule, --student-steps steps):
   `student` (distill.alpha 1: KD on the sampled soft labels), `student_topk` (the same on the top-k
   labels) and `ce_twin` (distill.alpha 0: next-token cross-entropy on the same tokens, no teacher); and a
   student with a tokenizer of its own (a byte-level BPE of as many ids trained on the same text:
   benchmarks/cross_tokenizer.py's `bpe_student`, OUT/arms/bpe_student), its records realigned from the
   teacher's (distill.cross_tokenizer=hybrid): `xtok_ce` (alpha 0) and `xtok_hybrid` (alpha XTOK_ALPHA);
6. the on-policy arms (issue #28): `on_policy`, `on_policy_cold[_long]`, `on_policy_rkl`, `on_policy_gjsd` (the
   divergence on its samples: reverse KL, generalised JSD at distill.beta), `on_policy_all` (λ 1),
   `on_policy_tasks` (continuing task prompts): the `student` arm's export fine-tuned on its soft labels with distill.on_policy (GKD: a
   share λ of the micro-batches are its own continuations of record starts, scored by the teacher, loaded
   once at world size 1); `on_policy_scratch` trains the student from its initialisation that way, λ
   ramped up (distill.on_policy_warmup_steps); in OUT/arms/<arm> as in 5;
7. the contrastive arms (issue #28): the contrastive stage (`stablekd run --stages contrastive`) fine-tunes
   the export of the arm it names (contrastive.init_from: `student`, `on_policy` for the arm with both,
   `xtok_hybrid` for `xtok_contrastive`, whose groups and KD anchor are realigned to its own tokenizer) on
   candidate groups of the same teacher, with the KD term on its soft labels as the anchor; the groups and
   that stream are one more LABELS run (OUT/teacher_candidates), each arm runs in OUT/arms/<arm>, whose
   teacher/ and soft_labels/ link it;
8. scoring every model the same way (exported Hugging Face directories loaded whole, fp32 on CPU):
   - bits per byte, perplexity and calibration error (ECE) over all of the held-out books;
   - fact exact match of kind (a) `fact_em_rephrased` (trained facts in a phrasing no training record
     uses, probe_rephrased.jsonl) with its cross-sample agreement/contradiction (greedy + evaluate.samples
     answers) and the paraphrase check (evaluate.task_templates), and kind (b) `fact_em_unasked` (facts the
     prose states that no training question asks, probe_unasked.jsonl): evaluation/task_probe.py, answers
     cut at data.answer_stop, at most ANSWER_TOKENS new tokens
     (benchmarks/real_text_scores.py);
   - rep-2/3/4 and diversity of greedy continuations of evaluate.prefixes held-out prefixes, distinct-2 of
     their samples (exactly evaluate.max_new_tokens tokens each: evaluation/report.py);
   - generation tokens/s on one fixed batch;
   and the compressors' bits per byte on the same held-out text given the training prose
   (benchmarks/compressors.py). Each model's figures are kept in OUT/scores/<arm>.json, reused for the
   same export and commit.
`--skip ARM,...` leaves on-policy or contrastive arms out of one invocation (not trained, not scored).
Prints the table and writes benchmarks/results/real_text.json (commit, cpu, command, compressors,
models: arm -> metrics, settings, goals, wall time of each phase).

Every phase's overrides and every arm's recipe are plain data in benchmarks/real_text_recipes.py.

Goals (issue "a teacher that knows the language"): teacher bits per byte <= 0.8 x the best compressor's;
student <= ce_twin and <= teacher in bits per byte; student rep-4 <= teacher's; teacher fact_em_rephrased
>= 0.6 and student's >= 0.95 x the teacher's. Across tokenizers: xtok_hybrid gains over xtok_ce at least
half of what `student` gains over `ce_twin`, in bits per byte. Issue #28 (each contrastive arm against the
arm it starts from): task cross-sample contradiction <= 0.5x, paraphrase contradiction <= 0.75x, fact exact match of
both kinds >= the student's - 0.01, bits per byte <= +2 %; each on-policy arm: rep-4 <= the teacher's at bits
per byte <= +2 % over the arm it starts from.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import arms as bench  # benchmarks/arms.py: this script's folder is on sys.path
import compressors
import kjv_corpus
import provenance
import single_rank
from real_text_arms import bpe_student, kept_arm, load_teacher, train_export
from real_text_recipes import (
    ARMS,
    CANDIDATES,
    CONTRASTIVE,
    GOAL_BPB_SHARE,
    GOAL_COMPRESSOR_SHARE,
    GOAL_CONTRADICTION_SHARE,
    GOAL_EM_DROP,
    GOAL_FACT_EM,
    GOAL_PARAPHRASE_SHARE,
    GOAL_STUDENT_EM_SHARE,
    GOAL_XTOK_SHARE,
    LABELS,
    ON_POLICY,
    PRETRAIN,
    XTOK_ALPHA,
)
from real_text_scores import scored
from transformers.utils import logging as hf_logging

from stablekd.data_pipeline.sources import resolve_paths
from stablekd.launcher.config import load_config

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "kjv.yaml"


def stablekd(args: list[str]) -> None:
    """One `stablekd` command (an argument list), its console on ours; a failure stops the benchmark."""
    cmd = [sys.executable, "-m", "stablekd.launcher.driver.cli", *args]
    print("$ stablekd " + " ".join(args), flush=True)
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        raise SystemExit(f"stablekd {args[0]} failed: see its lines above")


def as_given(path: Path) -> str:
    """A path inside the repository relative to it, as a user types it: data paths count in stage hashes
    verbatim, so a run started by hand with the same command is found done, not redone."""
    return os.path.relpath(path, REPO) if path.is_relative_to(REPO) else str(path)


def data_overrides(corpus: Path, train: str) -> list[str]:
    return [f"data.paths=[{as_given(corpus / train)}]", f"data.eval_paths=[{as_given(corpus / 'heldout')}]"]


def label_runs(out: Path, teacher: Path, corpus: Path) -> dict[str, Path]:
    """Each LABELS run directory, its soft labels written (`stablekd run --stages soft_labels` in a
    directory whose teacher/ links the finished teacher: labelled, never retrained; resumable)."""
    runs = {"sampled": teacher}
    for name, overrides in LABELS.items():
        if not overrides:
            continue
        run = runs[name] = out / f"teacher_{name}"
        if not (run / "teacher").exists():
            (run / "ds").mkdir(parents=True, exist_ok=True)
            (run / "teacher").symlink_to(teacher / "teacher")
            shutil.copy(teacher / "ds" / "teacher.json", run / "ds" / "teacher.json")
        stablekd(["run", as_given(CONFIG), "--stages", "soft_labels", f"run.out_dir={as_given(run)}",
                  f"teacher.init_from={as_given(out / 'pretrain')}", *data_overrides(corpus, "mixed.jsonl"),
                  *overrides])  # fmt: skip
    return runs


def train_students(runs: dict[str, Path], out: Path, steps: int) -> dict[str, dict]:
    """The KD students and the CE twin, each on its LABELS run's soft labels (see the module doc), each
    exported to OUT/arms/<arm>/student/hf; an arm already exported is not retrained."""
    info = {}
    for arm, (labels, alpha, tokenizer) in ARMS.items():
        arm_dir = out / "arms" / arm
        if (kept := kept_arm(arm_dir)) is not None:
            info[arm] = kept
            continue
        student, extra = "", ["distill.log_every=10"]
        if tokenizer == "bpe":
            student, extra = str(bpe_student(runs[labels], out)), [*extra, "distill.cross_tokenizer=hybrid"]
        args = SimpleNamespace(alpha=alpha, student=student, dtype="")
        cfg = bench.arm_config(runs[labels], arm_dir, args, online=False, extra=extra)
        print(
            f"[{arm}] {labels} soft labels, distill.alpha={alpha}, {tokenizer} tokenizer, {steps} steps",
            flush=True,
        )
        info[arm] = train_export(cfg, steps, {"labels": labels, "alpha": alpha, "tokenizer": tokenizer})
    return info


def on_policy_arms(runs: dict[str, Path], out: Path, arms: dict) -> dict[str, dict]:
    """Each of `arms` (ON_POLICY's entries to run): the export of the arm it starts from (student.model: a Hugging Face directory with
    the run's tokenizer) fine-tuned its steps on that arm's soft labels and alpha with its
    overrides, the teacher scoring its samples (artifacts.sharded_teacher at world size 1, loaded once: every
    LABELS run has the one teacher; not at all when no arm is left to train); kept as train_students keeps."""
    info, teacher = {}, None
    for arm, (start, steps, overrides) in arms.items():
        arm_dir = out / "arms" / arm
        if (kept := kept_arm(arm_dir)) is not None:
            info[arm] = kept
            continue
        labels, alpha, _ = ARMS[start or "student"]
        student = (
            str(out / "arms" / start / "student" / "hf") if start else ""
        )  # "": the config's, from scratch
        args = SimpleNamespace(alpha=alpha, student=student, dtype="")
        cfg = bench.arm_config(
            runs[labels], arm_dir, args, online=False, extra=["distill.log_every=10", *overrides]
        )
        if teacher is None:
            teacher = load_teacher(runs[labels], cfg)
        print(f"[{arm}] from {start or 'scratch'}: {' '.join(overrides)}, {steps} steps", flush=True)
        summary = {"labels": labels, "alpha": alpha, "from": start, "overrides": overrides}
        info[arm] = train_export(cfg, steps, summary, teacher)
    return info


def contrastive_arms(runs: dict[str, Path], out: Path, corpus: Path, arms: dict) -> dict[str, dict]:
    """Each of `arms` (CONTRASTIVE's entries to run): `stablekd run --stages contrastive` in OUT/arms/<arm>, whose teacher/ and
    soft_labels/ link its LABELS run's (read only: the stage writes contrastive/, ds/, tb/), from the
    exported arm it names (contrastive.init_from); exported to OUT/arms/<arm>/contrastive/hf. An arm with
    its export and arm.json is not retrained; a killed one resumes from its checkpoint (the stage's own). An
    arm from a student with its own tokenizer names that student (student.model) and its loss across
    tokenizers (distill.cross_tokenizer=hybrid at its alpha: the KD anchor and the realigned groups)."""
    info = {}
    for arm, (labels, start, overrides) in arms.items():
        arm_dir, src = out / "arms" / arm, runs[labels]
        summary = arm_dir / "arm.json"
        if (arm_dir / "contrastive" / "hf" / "config.json").is_file() and summary.is_file():
            info[arm] = json.loads(summary.read_text())
            continue
        (arm_dir / "ds").mkdir(parents=True, exist_ok=True)
        for part in ("teacher", "soft_labels"):
            if not (arm_dir / part).exists():
                (arm_dir / part).symlink_to((src / part).resolve())
        shutil.copy(src / "ds" / "teacher.json", arm_dir / "ds" / "teacher.json")
        hf = out / "arms" / start / "student" / "hf"
        _, alpha, tokenizer = ARMS.get(start, ("", 0.0, "run"))
        if tokenizer == "bpe":
            student = bpe_student(runs["sampled"], out)
            overrides = [*overrides, f"student.model={as_given(student)}", "distill.cross_tokenizer=hybrid",
                         f"distill.alpha={alpha}"]  # fmt: skip
        t0 = time.perf_counter()
        stablekd(["run", as_given(CONFIG), "--stages", "contrastive", f"run.out_dir={as_given(arm_dir)}",
                  f"teacher.init_from={as_given(out / 'pretrain')}", *data_overrides(corpus, "mixed.jsonl"),
                  *LABELS[labels], f"contrastive.init_from={as_given(hf)}", *overrides])  # fmt: skip
        produced = json.loads((arm_dir / "contrastive" / "DONE.json").read_text())["produced"]
        info[arm] = {"labels": labels, "from": start, "overrides": overrides, "train_wall_s": time.perf_counter() - t0,
                     "done": produced}  # fmt: skip
        summary.write_text(json.dumps(info[arm], indent=1) + "\n")
    return info


def export_dirs(out: Path, on_policy: dict = ON_POLICY, contrastive: dict = CONTRASTIVE) -> dict[str, Path]:
    """Each model's exported Hugging Face directory in OUT (the teachers, ARMS and the given on-policy and
    contrastive arms), in the table's order."""
    return {
        "teacher_pretrained": out / "pretrain" / "teacher" / "hf",
        "teacher": out / "teacher" / "teacher" / "hf",
        **{arm: out / "arms" / arm / "student" / "hf" for arm in [*ARMS, *on_policy]},
        **{arm: out / "arms" / arm / "contrastive" / "hf" for arm in contrastive},
    }


def contrastive_goals(models: dict[str, dict], arm: str) -> dict[str, bool]:
    """Issue #28's goals of one contrastive arm against the arm it starts from (module doc)."""
    start = CONTRASTIVE[arm][1]
    c, s = models[arm], models[start]
    return {
        f"{arm} task contradiction <= {GOAL_CONTRADICTION_SHARE} x {start}'s": (
            c["task_contradiction"] <= GOAL_CONTRADICTION_SHARE * s["task_contradiction"]
        ),
        f"{arm} paraphrase contradiction <= {GOAL_PARAPHRASE_SHARE} x {start}'s": (
            c["task_paraphrase_contradiction"] <= GOAL_PARAPHRASE_SHARE * s["task_paraphrase_contradiction"]
        ),
        **{
            f"{arm} fact_em_{kind} >= {start}'s - {GOAL_EM_DROP}": (
                c[f"fact_em_{kind}"] >= s[f"fact_em_{kind}"] - GOAL_EM_DROP
            )
            for kind in ("rephrased", "unasked")
        },
        f"{arm} bpb <= {GOAL_BPB_SHARE} x {start}'s": c["bpb"] <= GOAL_BPB_SHARE * s["bpb"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "kjv", help="benchmark directory (resumable)")
    ap.add_argument("--verses", type=Path, help="`bible -f` output instead of the bible program")
    ap.add_argument(
        "--student-steps", type=int, default=0, help="steps of each student arm (0: distill.max_steps)"
    )
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "real_text.json")
    ap.add_argument(
        "--skip", default="", help="on-policy / contrastive arms to leave out this time (comma-separated)"
    )
    args = ap.parse_args()
    skip = {a for a in args.skip.split(",") if a}
    if unknown := skip - set(ON_POLICY) - set(CONTRASTIVE):
        ap.error(f"--skip: {', '.join(sorted(unknown))}: expected on-policy or contrastive arms: "
                 f"{', '.join([*ON_POLICY, *CONTRASTIVE])}")  # fmt: skip
    if orphans := [a for a, (_, start, _) in CONTRASTIVE.items() if start in skip and a not in skip]:
        ap.error(f"--skip: {', '.join(orphans)}: each starts from an arm left out; skip it too")
    on_policy = {a: v for a, v in ON_POLICY.items() if a not in skip}
    contrastive = {a: v for a, v in CONTRASTIVE.items() if a not in skip}
    out = args.out.resolve()
    os.chdir(REPO)  # the configs' data paths are relative to the repository
    corpus, pre, teacher = out / "corpus", out / "pretrain", out / "teacher"
    walls: dict[str, float] = {}

    t0 = time.perf_counter()
    if not (corpus / "manifest.json").is_file():
        kjv_corpus.build(corpus, kjv_corpus.read_verses(args.verses))
    walls["corpus_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    stablekd(["run", as_given(CONFIG), "--stages", "teacher", f"run.out_dir={as_given(pre)}", *data_overrides(corpus, "train"),
              *PRETRAIN])  # fmt: skip
    walls["pretrain_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    stablekd(["run", as_given(CONFIG), "--stages", "teacher,soft_labels", f"run.out_dir={as_given(teacher)}",
              f"teacher.init_from={as_given(pre)}", *data_overrides(corpus, "mixed.jsonl")])  # fmt: skip
    walls["finetune_and_labels_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    runs = label_runs(out, teacher, corpus)
    walls["other_labels_s"] = time.perf_counter() - t0

    single_rank.start(29541)
    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    cfg = load_config(teacher / "config.yaml")
    steps = args.student_steps or cfg.distill.max_steps
    students = train_students(runs, out, steps)
    walls["students_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    students.update(on_policy_arms(runs, out, on_policy))  # before on_policy_contrastive starts from it
    walls["on_policy_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    students.update(contrastive_arms(runs, out, corpus, contrastive))
    walls["contrastive_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    models = {}
    for arm, hf in export_dirs(out, on_policy, contrastive).items():
        models[arm] = scored(arm, hf, cfg, corpus, out)
    walls["scoring_s"] = time.perf_counter() - t0
    train_text = compressors.read_text([corpus / "train"])
    held_text = compressors.read_text(resolve_paths([corpus / "heldout"]))
    comp = compressors.conditional_bits_per_byte(train_text, held_text)

    best = min(comp.values())
    t, s, c = models["teacher"], models["student"], models["ce_twin"]
    xc, xh = models["xtok_ce"], models["xtok_hybrid"]
    goals = {
        f"teacher bpb <= {GOAL_COMPRESSOR_SHARE} x best compressor ({best:.3f})": t["bpb"] <= GOAL_COMPRESSOR_SHARE * best,
        "student bpb <= ce_twin bpb": s["bpb"] <= c["bpb"],
        "student bpb <= teacher bpb": s["bpb"] <= t["bpb"],
        "student rep-4 <= teacher rep-4": s["rep_4"] <= t["rep_4"],
        f"teacher fact_em_rephrased >= {GOAL_FACT_EM}": t["fact_em_rephrased"] >= GOAL_FACT_EM,
        f"student fact_em_rephrased >= {GOAL_STUDENT_EM_SHARE} x teacher's": (
            s["fact_em_rephrased"] >= GOAL_STUDENT_EM_SHARE * t["fact_em_rephrased"]
        ),
        f"xtok_hybrid's bpb gain over xtok_ce >= {GOAL_XTOK_SHARE} x student's over ce_twin": (
            xc["bpb"] - xh["bpb"] >= GOAL_XTOK_SHARE * (c["bpb"] - s["bpb"])
        ),
    }  # fmt: skip
    for arm, (start, _, _) in on_policy.items():
        o, start = models[arm], start or "student"  # from scratch: against the student of as many steps
        goals[f"{arm} rep-4 <= teacher rep-4"] = o["rep_4"] <= t["rep_4"]
        goals[f"{arm} bpb <= {GOAL_BPB_SHARE} x {start}'s"] = (
            o["bpb"] <= GOAL_BPB_SHARE * models[start]["bpb"]
        )
    for arm in contrastive:
        goals.update(contrastive_goals(models, arm))
    manifest = json.loads((corpus / "manifest.json").read_text())
    result = {
        **provenance.header(),
        "compressors": comp,
        "models": models,
        "students": students,
        "settings": {
            "config": str(CONFIG.relative_to(REPO)),
            "pretrain_overrides": PRETRAIN,
            "teacher_model": cfg.teacher.model,
            "student_model": cfg.student.model,
            "seq_len": cfg.data.seq_len,
            "tokenizer_vocab": cfg.tokenizer.vocab_size,
            "encoding": cfg.soft_labels.encoding,
            "draws": cfg.soft_labels.draws,
            "temperature": cfg.soft_labels.temperature,
            "student_steps": steps,
            "xtok_alpha": XTOK_ALPHA,
            "on_policy": {a: {"from": st, "steps": n, "overrides": o} for a, (st, n, o) in ON_POLICY.items()},
            "candidates": CANDIDATES,
            "contrastive": {
                arm: {"labels": lab, "from": start, "overrides": o}
                for arm, (lab, start, o) in CONTRASTIVE.items()
            },
            "heldout_books": manifest["heldout_books"],
            "heldout_bytes": len(held_text),
            "facts": manifest["facts"],
        },
        "goals": goals,
        "wall_s": walls,
        "teacher_done": {
            name: json.loads((d / "teacher" / "DONE.json").read_text())["produced"]
            for name, d in (("pretrain", pre), ("finetune", teacher))
        },  # fmt: skip
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"-> {args.json}")


# The table's columns (issue #28's list): key in a model's scores, header, format
COLUMNS = [
    ("params", "params (M)", ".2f"), ("bpb", "bits/byte", ".3f"), ("ece", "ECE", ".3f"),
    ("fact_em_rephrased", "fact EM (a)", ".3f"), ("fact_em_unasked", "fact EM (b)", ".3f"),
    ("task_contradiction", "contradiction (a)", ".3f"), ("fact_agreement_rephrased", "agreement (a)", ".3f"),
    ("task_paraphrase_contradiction", "paraphrase contra. (a)", ".3f"),
    ("rep_4", "rep-4 %", ".1f"), ("distinct_2", "distinct-2", ".3f"), ("gen_tokens_per_s", "gen tok/s", ",.0f"),
]  # fmt: skip


def summary(result: dict) -> str:
    """The README's sentence on this benchmark (tests/test_kjv_corpus.py holds it to the committed JSON)."""
    m, comp = result["models"], result["compressors"]
    best = min(comp, key=comp.get)
    return (
        f"held-out bits per byte: teacher {m['teacher']['bpb']:.3f} ({best} {comp[best]:.3f}), distilled "
        f"student {m['student']['bpb']:.3f}, its CE-trained twin {m['ce_twin']['bpb']:.3f}; fact exact match "
        f"on rephrased questions {m['teacher']['fact_em_rephrased']:.3f} / {m['student']['fact_em_rephrased']:.3f}"
        f" / {m['ce_twin']['fact_em_rephrased']:.3f}"
    )


# The README's rows: the teacher, the students of ARMS and issue #28's one table (the student + contrastive
# (the first recipe and the best), + on-policy, + both; the cross-tokenizer student + contrastive); every
# other arm is in docs/results.md's whole table (a row per arm kept the README growing past a screen).
README_MODELS = ("teacher", *ARMS, "contrastive", "contrastive_own_long", "on_policy", "on_policy_contrastive",
                 "xtok_contrastive")  # fmt: skip


def models_table(result: dict, names: tuple[str, ...] | None = None) -> str:
    """One row per model (all, or `names`): the scores, and the minutes its own training took (the arms';
    a contrastive or on-policy arm's on top of the arm it starts from)."""
    rows = []
    for name in names or result["models"]:
        m = result["models"][name]
        wall = result["students"].get(name, {}).get("train_wall_s")
        scaled = {**m, "params": m["params"] / 1e6}
        cells = [provenance.cell(scaled.get(key), fmt) for key, _, fmt in COLUMNS]
        rows.append([name, *cells, provenance.cell(wall and wall / 60, ".0f")])
    return provenance.markdown_table(["model", *(h for _, h, _ in COLUMNS), "train min"], rows)


def table(result: dict) -> str:
    """docs/results.md's table: the models, the compressors' bits per byte, the goals."""
    comp = ", ".join(f"{name} {bpb:.3f}" for name, bpb in result["compressors"].items())
    goals = "\n".join(f"- {'met' if ok else 'MISSED'}: {g}" for g, ok in result["goals"].items())
    return f"{models_table(result)}\n\nCompressors' bits per byte on the same held-out text, given the training text: {comp}.\n\n{goals}"


if __name__ == "__main__":
    main()
