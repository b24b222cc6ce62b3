"""The teacher side from the head chunk by chunk (model/head.py, data_pipeline/encodings.py `encode_head`):
soft-label writing and the online teacher never ask for whole [B, L, V] logits."""

from __future__ import annotations

import pytest
import safetensors.numpy as stnp
import torch

from stablekd.data_pipeline.online import OnlineSoftLabels
from stablekd.data_pipeline.soft_labels import SoftLabelWriter, soft_label_meta
from stablekd.data_pipeline.tokenizer import load_tokenizer
from stablekd.model.build import build_model
from tests.test_soft_labels_stage import _Batches


def test_the_teacher_side_runs_with_whole_logits_refused(tmp_path, monkeypatch):
    """The head's plain forward raises, as a head too big for memory would (issue 29, the teacher side): the
    sharded teacher's soft-label writing (the stage's path: `add_teacher`, its fidelity rows, the idle
    forward) and the online teacher still run, the head cut into several chunks a record, every encoding;
    they store byte for byte what `add_logits` and the former online source stored from the same logits
    (those the head made, which equal the whole forward's up to the matmul's rounding)."""
    from stablekd.data_pipeline import encodings
    from stablekd.data_pipeline.fidelity import PickedRows
    from stablekd.data_pipeline.shards.reader import widen
    from stablekd.data_pipeline.tokenizer import train_tokenizer
    from stablekd.model import head as head_module
    from stablekd.model.sharded_teacher import ShardedTeacher
    from stablekd.objectives import lm
    from stablekd.objectives.lm import HeadLoss

    texts = [f"person {i} was born in city {i % 7} and works at firm {i % 5}." for i in range(200)]
    train_tokenizer(texts, 320, tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    model = build_model("tiny", tok, 16, seed=0).eval()
    teacher = ShardedTeacher(engine=model, tokenizer=tok, checkpoint_id="x", tag="t", step=0, zero3=False)
    V, B, g = teacher.vocab_size, 3, torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, V, (B, 16), generator=g)} for _ in range(2)]
    for b in batches:
        b["labels"] = b["input_ids"].masked_fill(torch.arange(16) < 5, -100)
    whole = [teacher.logits(b["input_ids"]) for b in batches]  # before the refusal

    def refuse(*_a, **_k):
        raise AssertionError("whole [B, L, V] logits asked for")

    monkeypatch.setattr(head_module, "full_logits", refuse)
    monkeypatch.setattr(lm, "CHUNK_ELEMENTS", 5 * V)  # 5 rows a chunk: 4 chunks a record of 16
    with pytest.raises(AssertionError, match="whole"):
        teacher.logits(batches[0]["input_ids"])  # the patch can fail a test
    teacher.idle_forward()  # a rank with no data left: the head path too
    arms = [
        {"encoding": "topk", "k": 5, "logprob_bits": 16},
        {"encoding": "topp", "k": 6, "mean_entries": 2, "logprob_bits": 8},
        {"encoding": "sampled", "draws": 8, "proposal_temperature": 1.5},
    ]
    assert {a["encoding"] for a in arms} == set(encodings.REGISTRY)
    for arm in arms:
        meta = soft_label_meta("x", "h", V, 0.5, 16, **arm)
        ref = SoftLabelWriter(tmp_path / arm["encoding"] / "ref", 0, meta, 4, seed=3)
        new = SoftLabelWriter(tmp_path / arm["encoding"] / "head", 0, meta, 4, seed=3)
        made = []  # per batch: the logits the head made, row by row as it made them
        for b, logits in zip(batches, whole, strict=True):
            mask = b["labels"] != -100
            every, pos = PickedRows(torch.arange(B * 16)), torch.randperm(B * 16, generator=g)[:7]
            picked = PickedRows(pos)  # the stage's fidelity sample
            both = [every, picked]
            new.add_teacher(
                teacher, b["input_ids"], mask, lambda z, s, both=both: [p.observe(z, s) for p in both]
            )
            assert torch.allclose(every.rows, logits.reshape(-1, V), rtol=1e-5, atol=1e-6)
            assert torch.equal(picked.rows, every.rows[pos])
            ref.add_logits(b["input_ids"], every.rows.reshape(B, 16, V), mask)
            made.append(every.rows.reshape(B, 16, V))
        for w in (ref, new):
            w.close()
        files = sorted(p.name for p in (tmp_path / arm["encoding"] / "ref").glob("shard-*"))
        assert files and files == sorted(
            p.name for p in (tmp_path / arm["encoding"] / "head").glob("shard-*")
        )
        for f in files:  # every array's bytes (the header's metadata order is the writer library's own)
            a, b = (stnp.load_file(tmp_path / arm["encoding"] / d / f) for d in ("ref", "head"))
            assert a.keys() == b.keys(), (arm, f)
            for k in a:
                assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), (arm, f, k)

        torch.manual_seed(7)  # the online source draws its seeds from the global RNG
        got = list(OnlineSoftLabels(_Batches(batches), teacher, meta))
        torch.manual_seed(7)
        for out, b, logits in zip(got, batches, made, strict=True):  # what it computed from whole logits
            stored = encodings.encode(logits, meta, int(torch.randint(0, 2**62, ())))
            stored = {k: torch.from_numpy(widen(v)) for k, v in stored.items()}
            stored["input_ids"] = b["input_ids"].to(torch.int32)
            stored["loss_mask"] = (b["labels"] != -100).to(torch.int32)
            want = encodings.decode(stored, meta)
            assert out.keys() == want.keys()
            for k in want:
                assert out[k].dtype == want[k].dtype and torch.equal(out[k], want[k]), (arm, k)
    assert teacher.head(batches[0]["input_ids"], HeadLoss(lambda z, s: z.new_ones(()))) > 1  # chunks summed


def test_on_policy_scoring_and_loss_run_with_whole_logits_refused(tmp_path, monkeypatch):
    """On-policy (issue 29): with the head's plain forward raising, the sharded teacher scores a sample (its
    trunk in `scored`, its head gathered and run chunk by chunk inside the student's loss) and the student
    backpropagates; the term and the student's gradients are those of kd_sum on the two whole forwards."""
    from stablekd.data_pipeline.on_policy import OnPolicy
    from stablekd.data_pipeline.tokenizer import train_tokenizer
    from stablekd.model import head as head_module
    from stablekd.model.sharded_teacher import ShardedTeacher
    from stablekd.objectives import lm
    from stablekd.objectives.kd import kd_sum
    from stablekd.objectives.kd_losses import ON_POLICY, soft_label_loss, with_on_policy

    texts = [f"person {i} was born in city {i % 7} and works at firm {i % 5}." for i in range(200)]
    train_tokenizer(texts, 320, tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    model = build_model("tiny", tok, 16, seed=0).eval()
    student = build_model("tiny-student", tok, 16, seed=1).eval()  # eval: no dropout, two forwards compare
    teacher = ShardedTeacher(engine=model, tokenizer=tok, checkpoint_id="x", tag="t", step=0, zero3=False)
    V, P = teacher.vocab_size, 5
    gen = torch.Generator().manual_seed(0)
    tail = torch.randint(0, V, (3, 11), generator=gen)
    tail[0, 4] = tok.eos_token_id  # a sample that ends early: what follows its EOS is masked

    def sample(prompts: torch.Tensor, seed: int) -> torch.Tensor:  # generating needs whole last-row logits
        return torch.cat([prompts, tail], 1)

    source = OnPolicy([], sample, teacher, 1.0, P, 7, 0, tok.eos_token_id)
    prompts = {"input_ids": torch.randint(0, V, (3, 16), generator=gen)}
    ids = sample(prompts["input_ids"][:, :P], 0)
    monkeypatch.setattr(head_module, "full_logits", _refuse)
    monkeypatch.setattr(lm, "CHUNK_ELEMENTS", 5 * V)  # 5 rows a chunk: 4 chunks a record of 16
    with pytest.raises(AssertionError, match="whole"):
        teacher.logits(ids)
    batch = source.scored(prompts, 0)
    assert torch.equal(batch["input_ids"], ids) and "teacher_logits" not in batch
    labels = batch["labels"]
    for kind in ("fkl", "rkl", "mse"):
        out = with_on_policy(soft_label_loss(), kind, 2.0)(student, batch)
        student.zero_grad()
        out.sums[ON_POLICY].backward()
        got = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        monkeypatch.undo()  # the reference, from whole logits
        ref, _ = kd_sum(student(input_ids=ids).logits, teacher.logits(ids).detach(), labels, kind, 2.0)
        student.zero_grad()
        ref.backward()
        monkeypatch.setattr(head_module, "full_logits", _refuse)
        monkeypatch.setattr(lm, "CHUNK_ELEMENTS", 5 * V)
        assert torch.allclose(out.sums[ON_POLICY], ref, rtol=1e-5), (kind, out.sums[ON_POLICY], ref)
        for n, p in student.named_parameters():
            scale = p.grad.abs().max().clamp_min(1e-12)
            assert (got[n] - p.grad).abs().max() / scale < 1e-4, (kind, n)
        assert student.lm_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def _refuse(*_a, **_k):
    raise AssertionError("whole [B, L, V] logits asked for")
