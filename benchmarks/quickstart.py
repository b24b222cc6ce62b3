"""The quickstart, measured: `stablekd quickstart` on the built-in bios corpus, its report as the README's table.

    python benchmarks/quickstart.py [--out runs/qs]      # resumable: finished stages are not redone
    python benchmarks/quickstart.py --seed 1 --out runs/qs_seed1   # another run.seed: quickstart-seed1.json
    python benchmarks/quickstart.py --seeds              # the committed seeds side by side (seeds_table)

Runs the shipped pipeline (configs/quickstart.yaml, every stage, 2 ranks) into OUT, then writes
benchmarks/results/quickstart.json (quickstart-seed<N>.json with --seed N: run.seed seeds model init, data
order and sampling; the corpus is the same): commit, cpu, command, the seconds of each stage (from the stages'
DONE.json finish times: the first from this script's start, so a resumed run's first figure is only what
this invocation spent) and eval/report.json's models, ratios and sample sizes. Prints the README's table
(`table`; tests/test_docs.py holds the README to the committed JSON).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import provenance

from stablekd.launcher import rundir
from stablekd.launcher.config import load_config
from stablekd.launcher.driver.cli import QUICKSTART
from stablekd.launcher.stages import NAMES

REPO = provenance.REPO
RESULTS = REPO / "benchmarks" / "results"
MODEL_NAMES = {"teacher": "teacher", "student": "distilled student", "contrastive": "contrastive student"}
# README rows: (label, report keys shown " / "-joined, format, report key whose sample size ends the label)
ROWS: list[tuple[str, tuple[str, ...], str, str | None]] = [
    ("parameters", ("params",), "params", None),
    ("bios accuracy (greedy)", ("bios_accuracy",), ".3f", "bios_accuracy"),
    ("answered (greedy parses)", ("bios_answered",), ".3f", None),
    ("self-consistency (1 + K answers)", ("bios_self_consistency",), ".3f", None),
    ("cross-sample contradiction, trained people", ("bios_cross_contradiction",), ".3f", None),
    ("cross-sample contradiction, unseen people", ("bios_unseen_cross_contradiction",), ".3f", None),
    ("in-text contradiction", ("bios_intext_contradiction",), ".3f", "bios_intext_contradiction"),
    ("rep-2 / rep-3 / rep-4 (%)", ("rep_2", "rep_3", "rep_4"), ".1f", "rep_2"),
    ("diversity", ("diversity",), ".3f", None),
    ("coherence (cosine, teacher's embeddings)", ("coherence",), ".3f", None),
    ("held-out perplexity", ("ppl",), ".3f", "ppl"),
    ("calibration error (ECE)", ("ece",), ".3f", "ece"),
    ("generation tokens/s (one fixed batch)", ("gen_tokens_per_s",), "ratio", None),
]


def _cell(values: dict, ratios: dict | None, keys: tuple[str, ...], fmt: str) -> str:
    """`values`' keys formatted; params and speed with the ratio to the teacher's (`ratios`: None for the teacher)."""
    if any(values.get(k) is None for k in keys):
        return "–"
    if fmt == "params":
        text = f"{values['params'] / 1e6:.2f}M"
    elif fmt == "ratio":
        text = f"{values[keys[0]]:.0f}"
    else:
        return " / ".join(format(values[k], fmt) for k in keys)
    ratio = (ratios or {}).get(keys[0])
    return text if ratio is None else f"{text} ({ratio:.2g}×)"


def table(result: dict) -> str:
    """The README's table: one column per model, the report's sample sizes in the labels."""
    models, sizes = result["models"], result["sizes"]
    names = [n for n in MODEL_NAMES if n in models]
    ratios = {n: result["ratios"].get(f"{n}/teacher") for n in names}
    lines = [
        "| metric | " + " | ".join(MODEL_NAMES[n] for n in names) + " |",
        "| --- |" + " ---: |" * len(names),
    ]
    for label, keys, fmt, size_key in ROWS:
        if all(models[n].get(keys[0]) is None for n in names):
            continue
        if size_key and sizes.get(size_key):
            label = f"{label}, {sizes[size_key]}"
        cells = [_cell(models[n], ratios[n], keys, fmt) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_results() -> dict[int, dict]:
    """The committed runs by run.seed: quickstart.json is the config's seed (0), quickstart-seed<N>.json N."""
    out = {0: json.loads((RESULTS / "quickstart.json").read_text())}
    for path in sorted(RESULTS.glob("quickstart-seed*.json")):
        out[int(path.stem.removeprefix("quickstart-seed"))] = json.loads(path.read_text())
    return out


def seeds_table(results: dict[int, dict]) -> str:
    """One row per seed: cross-sample contradiction on trained people (teacher / distilled / contrastive) and
    the contrastive student's ratio to the distilled one's (the stability goal: <= 0.5x), accuracy, perplexity."""
    lines = [
        "| run.seed | commit | CPU | contradiction T / D / C | C ÷ D | accuracy T / D / C | ppl T / D / C |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for seed, r in sorted(results.items()):
        m = r["models"]
        cells = [
            " / ".join(f"{m[n][key]:.3f}" for n in MODEL_NAMES)
            for key in ("bios_cross_contradiction", "bios_accuracy", "ppl")
        ]
        ratio = m["contrastive"]["bios_cross_contradiction"] / m["student"]["bios_cross_contradiction"]
        lines.append(
            f"| {seed} | {r['commit'][:7]} | {'AMX' if r['cpu'].get('amx_bf16') else 'no AMX'} | {cells[0]} | {ratio:.2f} | {cells[1]} | {cells[2]} |"
        )
    return "\n".join(lines)


def stage_seconds(cfg, started: float) -> dict[str, float]:
    """Each finished stage's seconds: its DONE.json finish time minus the previous one's (the first: minus
    `started`), in pipeline order."""
    out, last = {}, started
    for name in NAMES:
        path = rundir.done_path(cfg, name)
        if path.is_file():
            end = dt.datetime.fromisoformat(json.loads(path.read_text())["finished"]).timestamp()
            out[name] = round(max(0.0, end - last))
            last = end
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/qs", help="run directory (run.out_dir; resumable)")
    ap.add_argument("--seed", type=int, help="run.seed (default: the config's, 0)")
    ap.add_argument("--json", type=Path, help="default: benchmarks/results/quickstart[-seed<N>].json")
    ap.add_argument("--seeds", action="store_true", help="print the committed seeds' table and exit")
    args = ap.parse_args()
    if args.seeds:
        print(seeds_table(seed_results()))
        return
    os.chdir(REPO)  # run.out_dir is relative to the working directory
    overrides = [f"run.out_dir={args.out}"] + ([f"run.seed={args.seed}"] if args.seed is not None else [])
    args.json = args.json or RESULTS / (
        "quickstart.json" if args.seed is None else f"quickstart-seed{args.seed}.json"
    )
    started = time.time()
    cmd = [sys.executable, "-m", "stablekd.launcher.driver.cli", "quickstart", *overrides]
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        raise SystemExit("stablekd quickstart failed: see its lines above")
    wall = time.time() - started
    cfg = load_config(QUICKSTART, overrides)
    report = json.loads((cfg.run_dir / "eval" / "report.json").read_text())
    result = {
        **provenance.header(["stablekd", "quickstart", *overrides]),
        "wall_s": round(wall),
        "stage_s": stage_seconds(cfg, started),
        "models": report["models"],
        "ratios": report["ratios"],
        "sizes": report["sizes"],
        "missing": report["missing"],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"-> {args.json}")


if __name__ == "__main__":
    main()
