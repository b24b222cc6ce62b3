"""The real-text fact probe at other sampling temperatures: how much of the cross-sample contradiction of
benchmarks/real_text.py's models is the tail of a small model's distribution at the probe's temperature.

    python benchmarks/probe_temperature.py [--out runs/kjv] [--temperatures 0.3,0.5,1.0] [--models ...]

Reads the exports `python benchmarks/real_text.py` left in OUT (run that first) and asks each model the
rephrased fact questions (kind (a), probe_rephrased.jsonl) exactly as its scoring does
(benchmarks/real_text_scores.py: 1 greedy + evaluate.samples sampled answers at evaluate.top_p, at most
ANSWER_TOKENS tokens, answers cut at data.answer_stop), once per temperature; the paraphrase check is
greedy and left out. At temperature 1 the figures are real_text.json's. Prints the table and writes
benchmarks/results/probe_temperature.json (commit, cpu, command, models: name -> temperature -> metrics).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import arms as bench  # benchmarks/arms.py: this script's folder is on sys.path
import provenance
import real_text
import torch
from real_text_scores import ANSWER_TOKENS
from transformers.utils import logging as hf_logging

from stablekd.data_pipeline.sources import Corpus
from stablekd.data_pipeline.tokenizer import load_tokenizer
from stablekd.evaluation.bios_probe import HFGenerator
from stablekd.evaluation.task_probe import held_out_tasks, probe_tasks
from stablekd.launcher.config import load_config
from stablekd.model.build import load_model

MODELS = ("teacher", "student", "ce_twin", "contrastive", "contrastive_own_long", "on_policy", "xtok_hybrid",
          "xtok_contrastive")  # fmt: skip
KEYS = {
    "task_exact_match": "exact_match",
    "task_agreement": "agreement",
    "task_contradiction": "contradiction",
}


def probe(hf: Path, cfg, corpus: Path, temperatures: list[float]) -> dict[str, dict[str, float]]:
    """temperature -> exact match (greedy), agreement and contradiction of one export on kind (a)."""
    device, dtype = bench.device_dtype()
    tok = load_tokenizer(hf)
    model = load_model(hf, tok, dtype).to(device).eval()
    docs = held_out_tasks(Corpus((corpus / "probe_rephrased.jsonl",)), 10**9)
    out = {}
    for t in temperatures:
        ecfg = dataclasses.replace(
            cfg.evaluate, temperature=t, max_new_tokens=ANSWER_TOKENS, task_templates=[]
        )
        gen = HFGenerator(model, tok, t, ecfg.top_p, ecfg.batch_size)
        with torch.inference_mode():
            r = probe_tasks(gen, tok, docs, ecfg, cfg.data.answer_stop).metrics
        out[str(t)] = {short: r[key] for key, short in KEYS.items()}
        print(f"{hf}: T {t}: {out[str(t)]}", flush=True)
    return out


def table(result: dict) -> str:
    temps = result["temperatures"]
    head = ["model", "fact EM (greedy)", *(f"contradiction / agreement, T {t}" for t in temps)]
    rows = []
    for name, by_t in result["models"].items():
        first = by_t[str(temps[0])]
        cells = [f"{by_t[str(t)]['contradiction']:.3f} / {by_t[str(t)]['agreement']:.3f}" for t in temps]
        rows.append([name, f"{first['exact_match']:.3f}", *cells])
    return provenance.markdown_table(head, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/kjv"), help="benchmarks/real_text.py's --out")
    ap.add_argument("--temperatures", default="0.3,0.5,1.0")
    ap.add_argument("--models", default=",".join(MODELS), help="models of real_text.json (comma-separated)")
    ap.add_argument(
        "--json", type=Path, default=provenance.REPO / "benchmarks" / "results" / "probe_temperature.json"
    )
    args = ap.parse_args()
    temperatures = [float(t) for t in args.temperatures.split(",")]
    out = args.out.resolve()
    exports = real_text.export_dirs(out)
    names = args.models.split(",")
    if missing := [n for n in names if not (exports.get(n, out / "none") / "config.json").is_file()]:
        ap.error(f"--models: no export of {', '.join(missing)} in {out}: run benchmarks/real_text.py first")
    os.chdir(provenance.REPO)  # the run's config names its data relative to the repository
    hf_logging.disable_progress_bar()
    cfg = load_config(out / "teacher" / "config.yaml")
    result = {
        **provenance.header(),
        "temperatures": temperatures,
        "top_p": cfg.evaluate.top_p,
        "samples": cfg.evaluate.samples,
        "models": {n: probe(exports[n], cfg, out / "corpus", temperatures) for n in names},
    }
    print(table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.json}")


if __name__ == "__main__":
    main()
