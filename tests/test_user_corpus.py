"""The user's data and models, end to end: public-domain prose read by paragraph plus a prompt/response
task file (tests/data/README.md), a Qwen2 teacher directory and a GPT-2 student directory with one
byte-level BPE `tokenizer.json` and differently padded vocabularies (tests/hf_models.py), through all five
stages with `stablekd run` on 2 ranks; then a second teacher run that starts from the first one's ZeRO-3
checkpoint and fine-tunes on the task records alone, with loss on the responses only."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as stnp
import torch
from transformers import AutoModelForCausalLM

from stablekd.data_pipeline.sources import Corpus, iter_documents
from stablekd.data_pipeline.stream import eval_batches
from stablekd.launcher.rank.monitor import read_scalars
from stablekd.objectives.lm import IGNORE_INDEX, nll_sum
from tests import early_launch
from tests.conftest import QUICKSTART, REPO, run_stablekd
from tests.hf_models import byte_level_tokenizer, model_dir

PROSE = REPO / "tests" / "data" / "kjv_genesis_exodus.txt"

TOKENS, TEACHER_ROWS, STUDENT_ROWS = 512, 640, 576  # both vocabularies padded, each its own way
COMMON = [
    "launch.nproc_per_node=2",
    "data.seq_len=64",
    "data.eval_fraction=0.05",
    "teacher.dtype=fp32",
    "teacher.micro_batch_size=4",
    "teacher.warmup_steps=2",
    "teacher.log_every=1",
    "teacher.eval_batches=2",
]


def _task_file(path: Path) -> Path:
    """Prompt/response records cut from the prose: a sentence, and the one that follows it."""
    records = []
    for para in iter_documents(Corpus((PROSE,), "paragraph")):
        sentences = re.split(r"(?<=[.:;]) ", para)
        if len(sentences) >= 2:
            records.append({"prompt": f"After: {sentences[0]}\nComes:", "response": f" {sentences[1]}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:300]))
    return path


@early_launch.fixture()
def prose_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prose")
    tok = byte_level_tokenizer(tmp / "tok", TOKENS)
    teacher = model_dir(tmp / "qwen2", "qwen2", tok, TEACHER_ROWS)
    student = model_dir(tmp / "gpt2", "gpt2", tok, STUDENT_ROWS)
    # data.paths are read in sorted path order, and 40 steps read ~20k tokens: the task file sorts first so
    # the counts below see all of its records, wherever the repository lies.
    tasks = _task_file(tmp / "a_tasks.jsonl")
    prose = tmp / "b_prose.txt"
    shutil.copyfile(PROSE, prose)
    run = tmp / "run"
    args = [
        f"run.out_dir={run}",
        f"data.paths=[{prose}, {tasks}]",
        *COMMON,
        f"teacher.model={teacher}",
        f"student.model={student}",
        "teacher.max_steps=40",
        "teacher.eval_every=20",
        "soft_labels.encoding=sampled",  # the default; the stage tests cover topk
        "soft_labels.draws=8",
        "soft_labels.max_sequences=16",
        "soft_labels.records_per_shard=4",
        "soft_labels.micro_batch_size=4",
        "soft_labels.candidate_contexts=4",
        "soft_labels.candidates_per_context=2",
        "soft_labels.generate_batch_size=4",
        "soft_labels.max_new_tokens=8",
        "distill.max_steps=6",
        "distill.micro_batch_size=4",
        "distill.log_every=1",
        "contrastive.max_steps=4",
        "contrastive.micro_batch_size=2",
        "contrastive.log_every=1",
        "evaluate.prefixes=8",
        "evaluate.max_new_tokens=32",
        "evaluate.samples=2",
        "evaluate.ppl_batches=2",
        "evaluate.task_prompts=4",
    ]
    run_stablekd("run", str(QUICKSTART), *args)
    return run, tasks, teacher


@pytest.mark.distributed
def test_prose_and_tasks_teacher_soft_labels_report(prose_run):
    run, _, _ = prose_run
    evals = read_scalars(run / "tb" / "teacher", "eval/loss")
    assert sorted(evals) == [20, 40] and evals[40] < evals[20]  # the held-out loss falls
    done = json.loads((run / "teacher" / "DONE.json").read_text())["produced"]
    stats = done["data_stats"]
    assert stats["task_records"] > 250 and stats["other_split"] > 10  # the held-out share of both files
    # The soft labels keep the task prompts out of the loss: some tokens learned, some not.
    masks = np.concatenate(
        [stnp.load_file(str(f))["loss_mask"].ravel() for f in sorted((run / "soft_labels").glob("shard-*"))]
    )
    assert 0 < masks.mean() < 1

    report = json.loads((run / "eval" / "report.json").read_text())
    teacher = report["models"]["teacher"]
    for key in (
        "ppl",
        "bpb",
        "rep_2",
        "rep_4",
        "diversity",
        "coherence",
        "task_exact_match",
        "task_agreement",
    ):
        assert key in teacher and key not in report["missing"], key
    assert "held-out tokens" in report["sizes"]["ppl"]
    assert report["sizes"]["rep_4"] == "8 held-out prefixes × 32 tokens"
    assert report["sizes"]["task_agreement"] == "4 held-out prompts × 3 answers"
    assert "task_rep_2" in report["missing"]  # 4 prompts' short answers: too few words, shown missing
    assert "| task: exact match (`task_exact_match`) |" in (run / "eval" / "report.md").read_text()


@pytest.mark.distributed
def test_own_models_run_every_stage_with_their_tokenizer_and_padded_vocabularies(prose_run):
    run, _, teacher = prose_run
    assert not (run / "tokenizer").exists()  # the teacher directory's tokenizer, no SentencePiece trained
    meta = json.loads((run / "soft_labels" / "manifest.json").read_text())["meta"]
    assert meta["vocab_size"] == TOKENS and meta["encoding"] == "sampled"  # ids < len(tokenizer) only
    ids = np.concatenate(
        [stnp.load_file(str(f))["sample_ids"].ravel() for f in sorted((run / "soft_labels").glob("shard-*"))]
    )
    assert ids.max() < TOKENS
    for stage, arch, rows in (
        ("student", "GPT2LMHeadModel", STUDENT_ROWS),
        ("contrastive", "GPT2LMHeadModel", STUDENT_ROWS),
    ):
        model = AutoModelForCausalLM.from_pretrained(run / stage / "hf")
        assert type(model).__name__ == arch and model.config.vocab_size == rows
    assert type(AutoModelForCausalLM.from_pretrained(run / "teacher" / "hf")).__name__ == "Qwen2ForCausalLM"
    # MFU from the GPT-2 student's own FLOPs (no Llama-only config field), logged by the shared loop.
    mfu = read_scalars(run / "tb" / "distill", "perf/mfu")
    assert mfu and all(v > 0 for v in mfu.values())
    report = json.loads((run / "eval" / "report.json").read_text())
    models = report["models"]
    assert set(models) == {"teacher", "student", "contrastive"} and all("ppl" in m for m in models.values())
    # The 4 candidate contexts are task prompts (the task file sorts first): their reference responses
    # labelled the groups, and the rule is in the contrastive stage's record and in the report.
    labels = json.loads((run / "contrastive" / "DONE.json").read_text())["produced"]["labels"]
    assert (
        labels["rule"] == "auto"
        and labels["groups"] == {"reference": 4}
        and report["contrastive_labels"] == labels
    )
    assert sum(labels["rows"].values()) == 4 * 3  # 2 samples + the gold row per group
    assert any("labelled with contrastive.labels=auto: 4 by reference" in n for n in report["notes"])
    from PIL import Image

    with Image.open(run / "eval" / "report.png") as img:
        assert img.format == "PNG" and img.size[0] > 0


@pytest.mark.distributed
def test_fine_tune_starts_from_the_zero_checkpoint_and_learns_responses_only(prose_run, tmp_path):
    first, tasks, teacher = prose_run
    run = tmp_path / "ft"
    proc = run_stablekd(
        "stage", "teacher", str(QUICKSTART), f"run.out_dir={run}", f"teacher.init_from={first}",
        f"data.paths=[{tasks}]", *COMMON, "teacher.max_steps=2", "teacher.eval_every=0", "teacher.lr=1e-9",
    )  # fmt: skip
    assert re.search(r"weights from .*teacher/ckpt/step0000040 \(its step 40\)", proc.stderr + proc.stdout)
    assert not (
        run / "tokenizer"
    ).exists()  # the previous run's tokenizer (its teacher's): the ids it learned
    # lr 1e-9: the export is the first teacher's weights, loaded rank by rank from its ZeRO-3 shards.
    a = AutoModelForCausalLM.from_pretrained(first / "teacher" / "hf", dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(run / "teacher" / "hf", dtype=torch.float32)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name

    # Its held-out loss is the first teacher's cross-entropy on the held-out responses only.
    done = json.loads((run / "teacher" / "DONE.json").read_text())["produced"]
    held = Corpus((tasks,), "paragraph", "eval", 0.05)
    masked = plain = (0.0, 0)
    with torch.no_grad():
        for rank in (0, 1):
            for batch in eval_batches(held, teacher, 64, 4, 2, rank, 2):
                logits = a(input_ids=batch["input_ids"]).logits[..., :TOKENS]  # padded rows never count
                assert (batch["labels"] == IGNORE_INDEX).any()
                s, n = nll_sum(logits, batch["labels"])
                masked = (masked[0] + float(s), masked[1] + int(n))
                s, n = nll_sum(logits, batch["input_ids"])
                plain = (plain[0] + float(s), plain[1] + int(n))
    assert done["eval_loss"] == pytest.approx(masked[0] / masked[1], rel=1e-4)
    assert abs(done["eval_loss"] - plain[0] / plain[1]) > 0.05
    stats = done["data_stats"]
    assert stats["task_records"] == stats["documents"] > 0  # every document read is a task record
