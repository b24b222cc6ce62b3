"""How benchmarks/real_text.py scores an exported model (`score`), and the scores it keeps per export
(`scored`: OUT/scores/<arm>.json, reused while the export and the scoring code are the same)."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import time
from pathlib import Path

import arms as bench  # benchmarks/arms.py: this script's folder is on sys.path
import torch

from stablekd.data_pipeline.align import TokenBytes
from stablekd.data_pipeline.sources import Corpus
from stablekd.data_pipeline.stream import eval_batches
from stablekd.data_pipeline.tokenizer import load_tokenizer
from stablekd.evaluation import report
from stablekd.evaluation.bios_probe import HFGenerator
from stablekd.evaluation.task_probe import held_out_tasks, probe_tasks
from stablekd.launcher import rundir
from stablekd.model.build import count_params, load_model

REPO = Path(__file__).resolve().parent.parent
ANSWER_TOKENS = 24  # an answer is one line: "an hundred and five years."


def score(hf: Path, cfg, corpus: Path) -> dict[str, float]:
    """Every metric of the table for one exported model (see the module doc)."""
    device, dtype = bench.device_dtype()
    tok = load_tokenizer(hf)
    model = load_model(hf, tok, dtype).to(device).eval()
    ecfg = cfg.evaluate
    gen = HFGenerator(model, tok, ecfg.temperature, ecfg.top_p, ecfg.batch_size)
    held = rundir.eval_files(cfg)
    m: dict[str, float] = {"params": count_params(model)}
    with torch.inference_mode():
        batches = eval_batches(held, hf, cfg.data.seq_len, report.PPL_MICRO_BATCH, 10**9, 0, 1)  # all of it
        ppl = report.held_out_scores(model, batches, TokenBytes.from_tokenizer(tok).lengths)
        m.update(ppl=ppl.ppl, ece=ppl.ece, bpb=ppl.bits_per_byte, heldout_tokens=ppl.tokens)
        answers = dataclasses.replace(ecfg, max_new_tokens=ANSWER_TOKENS)
        for kind, with_templates in (("rephrased", True), ("unasked", False)):
            docs = held_out_tasks(Corpus((corpus / f"probe_{kind}.jsonl",)), 10**9)
            probe_cfg = answers if with_templates else dataclasses.replace(answers, task_templates=[])
            r = probe_tasks(gen, tok, docs, probe_cfg, cfg.data.answer_stop).metrics
            m[f"fact_em_{kind}"] = r["task_exact_match"]
            m[f"fact_agreement_{kind}"] = r["task_agreement"]
            m[f"fact_contradiction_{kind}"] = r["task_contradiction"]
            if with_templates:  # kind (a) is the report's task probe: its keys as the report names them
                m["task_contradiction"] = r["task_contradiction"]
                m["task_paraphrase_contradiction"] = r["task_paraphrase_contradiction"]
                m["task_paraphrase_exact_match"] = r["task_paraphrase_exact_match"]
        prefixes = report.load_prefixes(held, tok, ecfg.prefixes, ecfg.prefix_tokens)
        m.update(report.degeneration(report.continue_prefixes(gen, prefixes, ecfg)))
        m["gen_tokens_per_s"] = report.generation_speed(
            gen, prefixes[: report.SPEED_BATCH], ecfg.max_new_tokens
        )
    return m


def scoring_digest(cfg) -> str:
    """What the figures of an export depend on besides its weights: score() and ANSWER_TOKENS, the
    evaluate section, the probe files and the evaluation package (not this file's arms: adding one keeps the
    others' scores)."""
    h = hashlib.sha256(inspect.getsource(score).encode())
    h.update(f"{ANSWER_TOKENS} {sorted(dataclasses.asdict(cfg.evaluate).items())}".encode())
    for path in sorted((REPO / "evaluation").glob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def scored(arm: str, hf: Path, cfg, corpus: Path, out: Path) -> dict[str, float]:
    """score() of one export, kept in OUT/scores/<arm>.json: scoring all models takes minutes each on a
    shared CPU, and a rerun that adds an arm should pay for that arm only. Reused only for the same
    export (its weights' names, sizes and mtimes: a retrained arm is scored again) and the same scoring
    (`scoring_digest`)."""
    weights = sorted(hf.glob("*.safetensors"))
    key = {
        "hf": str(hf),
        "weights": [[w.name, w.stat().st_size, w.stat().st_mtime_ns] for w in weights],
        "scoring": scoring_digest(cfg),
    }
    path = out / "scores" / f"{arm}.json"
    if path.is_file() and (kept := json.loads(path.read_text()))["key"] == key:
        print(f"scoring {arm}: {path} (scored already)", flush=True)
        return kept["metrics"]
    print(f"scoring {arm}", flush=True)
    t0 = time.perf_counter()
    metrics = score(hf, cfg, corpus)
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = {"key": key, "metrics": metrics, "wall_s": time.perf_counter() - t0}
    path.write_text(json.dumps(kept, indent=1) + "\n")
    return metrics
