"""Task data (data_pipeline/tasks.py): prompt/response and chat records, response-only labels through the
packed stream, the soft-label loss mask, task contexts for candidate groups, the task probe, and
teacher.init_from resolution."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stablekd.data_pipeline.answers import normalize
from stablekd.data_pipeline.contexts import document_contexts
from stablekd.data_pipeline.shards.loader import ShardLoader
from stablekd.data_pipeline.soft_labels import (
    SoftLabelWriter,
    finalize_soft_labels,
    soft_label_meta,
    soft_label_reader,
)
from stablekd.data_pipeline.sources import Corpus, SourceStats, read_documents
from stablekd.data_pipeline.stream import PackedStream
from stablekd.data_pipeline.tasks import Document, encode_documents, parse_record, render
from stablekd.data_pipeline.tokenizer import load_tokenizer, train_tokenizer
from stablekd.evaluation.task_probe import probe_tasks
from stablekd.launcher import models
from stablekd.launcher.config import ConfigError, EvaluateConfig, load_config, save_config
from stablekd.launcher.driver import prepare
from stablekd.objectives.kd import soft_label_counts, soft_label_targets
from stablekd.objectives.lm import IGNORE_INDEX

QA = [(f"Question {i}: where was person {i} born?\nAnswer:", f" In city {i % 7}.") for i in range(40)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [p + r for p, r in QA] * 5 + ["user: hello there\nassistant: general kenobi"] * 50
    return load_tokenizer(train_tokenizer(texts, 400, tmp_path_factory.mktemp("tok")))


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "tasks.jsonl"
    lines = [json.dumps({"prompt": p, "response": r}) for p, r in QA]
    lines.append(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    )
    lines.append(json.dumps({"text": "a plain document"}))
    lines.append(json.dumps({"prompt": "no response", "response": "  "}))  # bad: nothing to learn
    lines.append(json.dumps({"messages": [{"role": "user", "content": "only a question"}]}))  # bad
    lines.append(json.dumps({"messages": [{"role": "user"}]}))  # bad: no content
    path.write_text("\n".join(lines) + "\n")
    return path


def test_records_of_every_form_and_bad_ones_counted(task_file):
    stats = SourceStats()
    docs = list(read_documents([task_file], stats))
    assert (stats.documents, stats.task_records, stats.bad_lines) == (42, 41, 3)
    assert docs[0] == Document(QA[0][0] + QA[0][1], ((len(QA[0][0]), len(QA[0][0] + QA[0][1])),))
    assert (docs[0].prompt, docs[0].reference) == QA[0]
    chat = docs[40]
    assert chat.text == "user: hi\nassistant: yo" and chat.reference == "yo"
    assert chat.prompt == "user: hi\nassistant: "
    assert docs[41] == Document("a plain document") and not docs[41].is_task
    assert parse_record(["not", "a", "dict"]) is None


def test_only_response_tokens_are_learned(tok):
    doc = parse_record({"prompt": "Answer: ", "response": "city 3."})  # the prompt's space merges into ▁city
    ((ids, learned),) = encode_documents(tok, [doc])
    assert ids == tok("Answer: city 3.", add_special_tokens=False)["input_ids"]  # the whole text's ids
    pieces, context = tok.convert_ids_to_tokens(ids), len(tok.tokenize("Answer:"))
    assert learned == [False] * context + [True] * (len(ids) - context)
    assert pieces[context] == "▁city"  # a token straddling prompt and response is learned
    plain = encode_documents(tok, [Document("Answer: city 3.")])[0]
    assert plain == (ids, [True] * len(ids))


def test_chat_records_use_the_tokenizer_chat_template_when_it_has_one(tok):
    doc = parse_record({"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "again"}, {"role": "assistant", "content": "sure"},
    ]})  # fmt: skip
    assert render(tok, doc) == (doc.text, doc.spans)  # no template: the plain one
    assert [doc.text[slice(*s)] for s in doc.spans] == ["yo", "sure"]
    templated = tok.__class__.from_pretrained(tok.name_or_path)
    templated.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    text, spans = render(templated, doc)
    assert text == "<|user|>hi<|end|><|assistant|>yo<|end|><|user|>again<|end|><|assistant|>sure<|end|>"
    assert [text[slice(*s)] for s in spans] == ["yo<|end|>", "sure<|end|>"]


def test_packed_stream_labels_prompts_minus_100_and_resumes_inside_a_record(tok, task_file):
    corpus = Corpus((task_file,), split="all")
    stream = PackedStream(corpus, tok.name_or_path, 16, 2, loop=False)
    batches = list(stream)
    ids = torch.cat([b["input_ids"] for b in batches]).flatten().tolist()
    labels = torch.cat([b["labels"] for b in batches]).flatten().tolist()
    expected_ids, expected_labels = [], []
    for doc_ids, learned in encode_documents(tok, list(read_documents(corpus))):
        expected_ids += [*doc_ids, tok.eos_token_id]
        expected_labels += [t if k else IGNORE_INDEX for t, k in zip(doc_ids, learned, strict=True)]
        expected_labels.append(tok.eos_token_id if learned[-1] else IGNORE_INDEX)
    n = len(ids)
    assert ids == expected_ids[:n] and labels == expected_labels[:n]
    assert labels.count(IGNORE_INDEX) > n // 3  # the prompts are most of the text
    # Resume from a state taken inside a record: the carried buffer keeps its labels.
    states = [b["state"] for b in batches]
    k = next(i for i, s in enumerate(states) if "labels" in s)
    resumed = PackedStream(corpus, tok.name_or_path, 16, 2, loop=False)
    resumed.load_state_dict({"world_size": 1, "rank": 0, "num_workers": 0, "workers": {"0": states[k]}})
    rest = list(resumed)
    assert torch.equal(
        torch.cat([b["labels"] for b in rest]), torch.cat([b["labels"] for b in batches[k + 1 :]])
    )


def test_soft_labels_keep_the_mask_and_the_losses_count_only_learned_tokens(tmp_path):
    meta = soft_label_meta("teacher/ckpt/step1", "h", 50, 1.0, 6, "topk", k=4, logprob_bits=16)
    w = SoftLabelWriter(tmp_path, 0, meta, records_per_shard=2)
    ids = torch.arange(12).view(2, 6)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    topk = torch.zeros(2, 6, 4, dtype=torch.long) + torch.arange(4)
    w.add_batch(ids, topk, torch.full((2, 6, 4), -2.0), mask)
    w.close()
    finalize_soft_labels(tmp_path, 1)
    (batch,) = list(ShardLoader(soft_label_reader(tmp_path, {"k": 4}, 0, 1), 2))
    assert torch.equal(batch["loss_mask"], mask.to(torch.int32))
    labels = soft_label_targets(batch)
    assert labels[0, :2].tolist() == [IGNORE_INDEX] * 2 and torch.equal(labels[1], ids[1])
    # position t predicts t + 1: row 0 counts positions 1..4, row 1 positions 0..4
    assert soft_label_counts(batch) == {"kd": 4 + 5, "ce": 4 + 5}
    assert soft_label_counts({"input_ids": ids}) == {"kd": 10, "ce": 10}  # a set without the mask


def test_candidate_contexts_of_task_records_are_their_prompts(tok, task_file):
    contexts = document_contexts([task_file], tok, 3, max_context=100)
    for (ctx, gold, ref), (prompt, response) in zip(contexts, QA, strict=False):
        assert ref  # a task's response is the reference answer its candidate group is labelled by
        assert tok.decode(ctx[1:]) + tok.decode(gold[:-1]) in (prompt + response, prompt + response.strip())
        assert tok.decode(gold[:-1]).strip() == response.strip() and gold[-1] == tok.eos_token_id
    assert len(document_contexts([task_file], tok, 100, max_context=4)[0][0]) == 1 + 4  # EOS + the last 4


def test_candidate_contexts_of_tasks_only_skip_plain_documents(tok, task_file, tmp_path):
    mixed = tmp_path / "mixed.jsonl"
    prose = [{"text": "In the beginning God created the heaven and the earth."}] * 2
    qa = [{"prompt": p, "response": r} for p, r in QA[:2]]
    mixed.write_text("".join(json.dumps(d) + "\n" for d in (prose[0], qa[0], prose[1], qa[1])))
    assert [ref for _, _, ref in document_contexts([mixed], tok, 3, 100)] == [False, True, False]
    got = document_contexts([mixed], tok, 3, 100, tasks_only=True)  # n counts the task prompts
    assert got == document_contexts([task_file], tok, 2, 100)


def test_task_probe_scores_exact_match_agreement_and_contradiction(tok):
    docs = [parse_record({"prompt": p, "response": r}) for p, r in QA[:4]]

    def gen(prompts, n, greedy, max_new_tokens, min_new_tokens=0):
        # greedy: right for the first two prompts; samples: all agree on prompt 0, two values elsewhere
        if greedy:
            return [[f" in CITY {i % 7}!" if i < 2 else " nowhere"] for i in range(len(prompts))]
        return [[" In city 0."] * n if i == 0 else [" a", " b"] * (n // 2) for i in range(len(prompts))]

    r = probe_tasks(gen, tok, docs, EvaluateConfig(samples=4))
    assert r.metrics["task_exact_match"] == 0.5
    assert r.metrics["task_contradiction"] == 0.75  # prompts 1..3 answer with >= 2 values
    assert r.metrics["task_agreement"] == pytest.approx((1 + 2 / 5 * 3) / 4)
    assert "task_rep_2" in r.missing and r.sizes["task_exact_match"] == "4 held-out prompts"
    assert normalize("  In   City 3. ") == "in city 3"
    assert "task_paraphrase_contradiction" not in r.metrics  # no templates, no paraphrase check


def test_task_probe_paraphrase_check_asks_each_prompt_in_every_template(tok):
    docs = [parse_record({"prompt": p, "response": r}) for p, r in QA[:4]]
    asked: list[str] = []

    def gen(prompts, n, greedy, max_new_tokens, min_new_tokens=0):
        asked.extend(prompts)

        # the record's own phrasing and "Briefly" answer right; "Say" is right only for prompt 0, and
        # answers prompt 1 with a second sentence after the right answer (not a different answer)
        def one(p: str, i: int) -> str:
            right = f" in city {i % 7}."
            if p.startswith("Say") and i == 1:
                return right + " Then more text."
            return right if not p.startswith("Say") or i == 0 else " elsewhere."

        return [[one(p, i)] * n for i, p in enumerate(prompts)]

    cfg = EvaluateConfig(samples=2, task_templates=["Briefly: {prompt}", "Say {prompt}"])
    r = probe_tasks(gen, tok, docs, cfg)
    prompts = [d.prompt for d in docs]
    assert [f"Say {p}" for p in prompts] == asked[-4:] and [f"Briefly: {p}" for p in prompts] == asked[-8:-4]
    assert r.metrics["task_paraphrase_contradiction"] == 0.5  # prompts 2 and 3 differ under "Say"
    assert r.metrics["task_paraphrase_exact_match"] == pytest.approx((4 / 4 + 2 / 4) / 2)
    assert r.sizes["task_paraphrase_contradiction"] == "4 held-out prompts × 3 phrasings (greedy)"
    with pytest.raises(ConfigError, match="task_templates: 'no slot'"):
        EvaluateConfig(task_templates=["no slot"])
    with pytest.raises(ConfigError, match="no other field"):
        EvaluateConfig(task_templates=["{prompt} {other}"])


def test_init_from_a_previous_run_takes_its_tokenizer_shapes_and_checkpoint(tmp_path):
    prev = load_config(None, [f"run.out_dir={tmp_path / 'prev'}", "teacher.model=tiny"])
    prev.run_dir.mkdir()
    save_config(prev, prev.run_dir / "config.yaml")
    cfg = load_config(None, [f"run.out_dir={tmp_path / 'ft'}", f"teacher.init_from={prev.run_dir}"])
    assert models.teacher_source(cfg) == "tiny"  # the previous run's shapes, whatever teacher.model says
    assert models.tokenizer_dir(cfg) == prev.run_dir / "tokenizer" and not models.trains_tokenizer(cfg)
    assert models.teacher_init_checkpoint(cfg) == prev.run_dir / "teacher" / "ckpt"
    with pytest.raises(ConfigError, match="teacher/ckpt has no complete checkpoint"):
        prepare.check_files(cfg)
    (prev.run_dir / "teacher" / "ckpt").mkdir(parents=True)
    (prev.run_dir / "teacher" / "ckpt" / "complete.json").write_text('{"tag": "step1", "step": 1}')
    with pytest.raises(ConfigError, match="trained with the tokenizer .*tokenizer, which is gone"):
        prepare.check_files(cfg)
    (prev.run_dir / "tokenizer").mkdir()
    prepare.check_files(cfg)

    # A Hugging Face directory is teacher.model's: init_from names it in a one-line refusal.
    hf = tmp_path / "hf"
    hf.mkdir()
    cfg = load_config(None, [f"run.out_dir={tmp_path / 'ft2'}", f"teacher.init_from={hf}"])
    with pytest.raises(ConfigError, match="has no config.yaml"):
        prepare.check_files(cfg)
    (hf / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=f"not a stablekd run: set teacher.model={hf}"):
        prepare.check_files(cfg)


def test_teacher_model_directory_brings_its_tokenizer(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    cfg = load_config(None, [f"run.out_dir={tmp_path / 'run'}", f"teacher.model={hf}"])
    assert models.trains_tokenizer(cfg)  # no tokenizer in the directory: SentencePiece on the corpus
    (hf / "tokenizer.json").write_text("{}")
    assert models.teacher_source(cfg) == str(hf) and models.tokenizer_dir(cfg) == hf
    assert not models.trains_tokenizer(cfg) and models.teacher_init_checkpoint(cfg) is None
    own = tmp_path / "own"
    cfg = load_config(
        None, [f"run.out_dir={tmp_path / 'run'}", f"teacher.model={hf}", f"tokenizer.path={own}"]
    )
    assert models.tokenizer_dir(cfg) == own  # tokenizer.path wins


def test_mask_array_is_uint8_on_disk(tmp_path):
    meta = soft_label_meta("c", "h", 50, 1.0, 3, "topk", k=2, logprob_bits=16)
    w = SoftLabelWriter(tmp_path, 0, meta, records_per_shard=1)
    w.add_batch(np.zeros((1, 3), np.int32), np.zeros((1, 3, 2), np.int64), np.zeros((1, 3, 2)))
    w.close()
    m = json.loads((tmp_path / "manifest.r000.json").read_text())
    assert m["schema"]["loss_mask"] == {"dtype": "uint8", "shape": [3]}
