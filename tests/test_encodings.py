"""Soft-label encodings (data_pipeline/encodings.py) and their losses (objectives/kd.py): 8-bit
log-probs within the stated bound, top-p entries and budget, sampled ids with unbiased weights, losses
against float64 references written here, the sampled gradient's expectation, fidelity, and the format
through writer, shards and reader."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stablekd.data_pipeline.encodings import Decoded, decode, encode, schema
from stablekd.data_pipeline.fidelity import fidelity
from stablekd.data_pipeline.logprobs import dequantize, quantize
from stablekd.data_pipeline.shards.loader import ShardLoader
from stablekd.data_pipeline.soft_labels import (
    SoftLabelWriter,
    finalize_soft_labels,
    soft_label_meta,
    soft_label_reader,
)
from stablekd.objectives.kd import SampledLabels, kd_sum

V, L = 40, 5


def _meta(**kw) -> dict:
    base = {"temperature": 1.0, "vocab_size": V, "seq_len": L, "loss_mask": True, "logprob_bits": 16}
    return {**base, **kw}


def _stored(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Arrays as a ShardLoader hands them out: unsigned ints widened to int32."""
    return {
        k: torch.from_numpy(a.astype(np.int32) if a.dtype in (np.uint8, np.uint16) else a)
        for k, a in arrays.items()
    }


def _decoded(logits: torch.Tensor, meta: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    arrays = encode(logits, meta, seed)
    for name, a in arrays.items():  # what encode makes is what the schema declares
        assert (a.dtype, tuple(a.shape[1:])) == schema(meta)[name], name
    return decode({**_stored(arrays), "input_ids": torch.zeros(logits.shape[:2], dtype=torch.int32)}, meta)


def test_8bit_logprobs_stay_within_the_stated_bound():
    p = torch.cat([torch.logspace(-8, 0, 2000, dtype=torch.float64), torch.rand(2000, dtype=torch.float64)])
    codes = quantize(p.log())
    assert codes.dtype == torch.uint8
    p_hat = dequantize(codes).double().exp()
    assert ((p_hat - p).abs() <= p.sqrt() / 255 + 1 / 260100 + 1e-7).all()
    assert dequantize(torch.tensor([0])).item() == -math.inf and dequantize(torch.tensor([255])).item() == 0.0


def test_topp_keeps_entries_to_the_mass_within_the_record_budget():
    torch.manual_seed(0)
    logits = torch.randn(1, L, V) * torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0])[:, None]
    lp = torch.log_softmax(logits[0].double(), -1)
    roomy = _decoded(logits, _meta(encoding="topp", k=30, mass=0.8, mean_entries=30))
    tight = _decoded(logits, _meta(encoding="topp", k=30, mass=0.8, mean_entries=3))
    for dec, budget in ((roomy, None), (tight, 3 * L)):
        lps, ids = dec["topk_logprobs"][0], dec["topk_ids"][0]
        kept = torch.isfinite(lps)
        n = kept.sum(-1)
        assert (n >= 1).all() and (budget is None or n.sum() <= budget)
        for t in range(L):
            order = lp[t].argsort(descending=True)
            assert ids[t, : n[t]].tolist() == order[: n[t]].tolist()  # the most probable, in order
            assert (ids[t, n[t] :] == ids[t, 0]).all()  # padding repeats the first id
            if budget is None:  # until the mass is reached (or k entries)
                cum = lp[t].exp()[order].cumsum(0)
                assert n[t] == min(30, int((cum < 0.8).sum()) + 1)
    # Over budget the least probable entries go first: every dropped entry is below every kept one
    # (a position's first entry is never dropped).
    full, cut = torch.isfinite(roomy["topk_logprobs"][0]), torch.isfinite(tight["topk_logprobs"][0])
    dropped = roomy["topk_logprobs"][0][full & ~cut]
    assert dropped.numel() and dropped.max() <= tight["topk_logprobs"][0][cut][:, None].min() + 1e-3


def _bins_reference(s_lp: torch.Tensor, ids: list[int], t_lp: list[float], kind: str, beta: float) -> float:
    """One position in float64, explicit loops: k real entries + the tail bin."""
    p = [math.exp(x) for x in t_lp]
    q = [math.exp(float(s_lp[i])) for i in ids]
    p.append(max(0.0, 1 - sum(p)))
    q.append(1 - sum(q))

    def kl(a, b):
        return sum(x * (math.log(x) - math.log(y)) for x, y in zip(a, b, strict=True) if x > 0 and y > 0)

    if kind == "fkl":
        return kl(p, q)
    if kind == "rkl":
        return kl(q, p)
    if kind == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q, strict=True))
    m = [beta * x + (1 - beta) * y for x, y in zip(p, q, strict=True)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "tvd", "gjsd"])
@pytest.mark.parametrize("encoding", ["topp8", "topk8"])
def test_losses_on_decoded_entries_equal_the_reference(kind, encoding):
    torch.manual_seed(1)
    T = 2.0
    teacher, student = torch.randn(2, L, V) * 3, torch.randn(2, L, V, dtype=torch.float64)
    if encoding == "topp8":
        meta = _meta(encoding="topp", k=12, mass=0.7, mean_entries=4, logprob_bits=8, temperature=T)
    else:
        meta = _meta(encoding="topk", k=6, logprob_bits=8, temperature=T)
    dec = _decoded(teacher, meta)
    labels = torch.randint(0, V, (2, L))
    got, n = kd_sum(student, (dec["topk_ids"], dec["topk_logprobs"]), labels, kind, T, beta=0.3)
    want = 0.0
    for b in range(2):
        for t in range(L - 1):  # position t predicts t + 1; the last predicts nothing
            lps = dec["topk_logprobs"][b, t].double()
            keep = torch.isfinite(lps)
            s_lp = torch.log_softmax(student[b, t] / T, -1)
            ids = dec["topk_ids"][b, t][keep].tolist()
            want += _bins_reference(s_lp, ids, lps[keep].tolist(), kind, 0.3) * T**2
    assert int(n) == 2 * (L - 1)
    assert float(got) == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_sampled_loss_equals_its_reference_and_needs_fkl():
    torch.manual_seed(2)
    T = 1.5
    meta = _meta(encoding="sampled", draws=8, proposal_temperature=3.0, temperature=T)
    dec = _decoded(torch.randn(2, L, V) * 2, meta)
    student = torch.randn(2, L, V, dtype=torch.float64)
    labels = torch.randint(0, V, (2, L))
    teacher = SampledLabels(dec["sample_ids"], dec["sample_weights"])
    got, _ = kd_sum(student, teacher, labels, "fkl", T)
    want = 0.0
    for b in range(2):
        for t in range(L - 1):
            s_lp = torch.log_softmax(student[b, t] / T, -1)
            for i, w in zip(
                dec["sample_ids"][b, t].tolist(), dec["sample_weights"][b, t].tolist(), strict=True
            ):
                want -= w * float(s_lp[i]) * T**2
    assert float(got) == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match="forward KL only"):
        kd_sum(student, teacher, labels, "rkl", T)


@pytest.mark.parametrize("proposal_t", [0.0, 2.5])
def test_sampled_gradient_is_unbiased(proposal_t):
    """The mean gradient over many independent draws equals the full-logit forward-KL gradient within
    4 standard errors, for every logit (teacher as proposal, and a flatter proposal with weights)."""
    torch.manual_seed(3)
    T, draws, rounds = 2.0, 4, 3000
    teacher = torch.randn(1, 2, V) * 2
    student = torch.randn(1, 2, V, dtype=torch.float64, requires_grad=True)
    labels = torch.zeros(1, 2, dtype=torch.long)  # position 0 counted
    full, _ = kd_sum(student, teacher.double(), labels, "fkl", T)
    (g_full,) = torch.autograd.grad(full, student)
    meta = _meta(encoding="sampled", draws=draws, proposal_temperature=proposal_t, temperature=T, seq_len=2)
    # One record per round (record b is drawn with seed b) and one copy of the student per record, so one
    # backward gives every round's gradient: records are independent rows of the loss.
    dec = _decoded(teacher.expand(rounds, 2, V), meta, 0)
    copies = student.detach().expand(rounds, 2, V).clone().requires_grad_()
    labels = labels.expand(rounds, 2)
    loss, _ = kd_sum(
        copies, SampledLabels(dec["sample_ids"], dec["sample_weights"].double()), labels, "fkl", T
    )
    g = torch.autograd.grad(loss, copies)[0][:, 0]  # [rounds, V]
    mean, se = g.mean(0), g.std(0) / math.sqrt(rounds)
    assert ((mean - g_full[0, 0]).abs() <= 4 * se + 1e-12).all()


def test_fidelity_is_the_kl_to_the_stored_entries_plus_a_flat_tail():
    torch.manual_seed(4)
    T, k = 1.5, 8
    logits = torch.randn(16, V) * 3
    f = fidelity(logits, _meta(encoding="topk", k=k, temperature=T))
    p = torch.softmax(logits.double() / T, -1)
    kl = mass = 0.0
    for row in p:  # float64 reference: q = the top-k probabilities, the rest of the mass spread evenly
        top = row.argsort(descending=True)[:k]
        kept = float(row[top].sum())
        q = torch.full((V,), (1 - kept) / (V - k), dtype=torch.float64)
        q[top] = row[top]
        kl += float((row * (row / q).log()).sum())
        mass += kept
    assert f["tokens"] == 16 and f["topk_mass"] == pytest.approx(mass / 16, rel=1e-5)
    assert f["kl"] == pytest.approx(kl / 16, rel=2e-3, abs=1e-5)  # float16-stored log-probs
    more = fidelity(logits, _meta(encoding="topk", k=16, temperature=T))
    assert more["kl"] < f["kl"] and more["topk_mass"] > f["topk_mass"]
    coarse = fidelity(logits, _meta(encoding="topk", k=k, temperature=T, logprob_bits=8))
    assert f["kl"] < coarse["kl"] < f["kl"] + 0.01  # 8-bit rounding costs a little
    s = fidelity(logits, _meta(encoding="sampled", draws=8, proposal_temperature=0.0, temperature=T))
    assert s["kl"] is None and 0 < s["topk_mass"] < 1


@pytest.mark.parametrize(
    "params",
    [
        {"encoding": "topk", "k": 6, "logprob_bits": 8},
        {"encoding": "topp", "k": 12, "mass": 0.8, "mean_entries": 3, "logprob_bits": 8},
        {"encoding": "sampled", "draws": 6, "proposal_temperature": 0.0},
    ],
)
def test_writer_shards_and_reader_give_the_decoded_batches(tmp_path, params):
    torch.manual_seed(5)
    meta = soft_label_meta("teacher/ckpt/step1", "h", V, 1.0, L, **params)
    w = SoftLabelWriter(tmp_path, 0, meta, records_per_shard=3)
    logits, ids = torch.randn(4, L, V) * 2, torch.randint(0, V, (4, L))
    mask = torch.ones(4, L, dtype=torch.int32)
    w.add_logits(ids, logits, mask)
    w.close()
    finalize_soft_labels(tmp_path, 1)
    got = list(Decoded(ShardLoader(soft_label_reader(tmp_path), 4), meta))
    assert len(got) == 1
    want = _decoded(logits, meta, w.seed_of(0))
    assert torch.equal(got[0]["input_ids"], ids.to(torch.int32))
    for k, v in want.items():
        if k != "input_ids":
            assert torch.equal(got[0][k].to(v.dtype), v), k


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["soft_labels.encoding=zip"], "soft_labels.encoding: expected one of topk, topp, sampled"),
        (["soft_labels.logprob_bits=12"], "soft_labels.logprob_bits: expected 8 or 16"),
        (["soft_labels.encoding=topp", "soft_labels.k=300"], "soft_labels.k: at most 255"),
        (["soft_labels.encoding=sampled", "distill.kind=rkl"], "distill.kind: sampled soft labels"),
        (["soft_labels.mass=0"], "soft_labels.mass: expected a value in"),
    ],
)
def test_encoding_settings_are_checked(overrides, message):
    from stablekd.launcher.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, ["tokenizer.vocab_size=2000", *overrides])


def test_a_reader_refuses_a_set_of_another_encoding(tmp_path):
    from stablekd.data_pipeline.shards.format import ShardError

    meta = soft_label_meta("c", "h", V, 1.0, L, "topk", k=4, logprob_bits=16)
    w = SoftLabelWriter(tmp_path, 0, meta, records_per_shard=2)
    w.add_logits(torch.zeros(1, L, dtype=torch.long), torch.randn(1, L, V))
    w.close()
    finalize_soft_labels(tmp_path, 1)
    want = {**meta, "encoding": "sampled", "draws": 8}
    with pytest.raises(ShardError, match="encoding"):
        soft_label_reader(tmp_path, {k: want[k] for k in ("encoding", "draws")})


# Every registered encoding's arms, the parameters each meaning draws or truncates differently.
HEAD_ARMS = [
    {"encoding": "topk", "k": 5, "logprob_bits": 16},
    {"encoding": "topk", "k": 5, "logprob_bits": 8},
    {"encoding": "topp", "k": 6, "mass": 0.8, "mean_entries": 2, "logprob_bits": 8},
    {"encoding": "topp", "k": 6, "mass": 0.99, "mean_entries": 9, "logprob_bits": 16},
    {"encoding": "sampled", "draws": 8, "proposal_temperature": 0.0},
    {"encoding": "sampled", "draws": 12, "proposal_temperature": 1.5},
]


def test_the_head_arms_cover_every_registered_encoding():
    from stablekd.data_pipeline.encodings import REGISTRY

    assert {a["encoding"] for a in HEAD_ARMS} == set(REGISTRY)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_encoded_chunk_by_chunk_is_encoded_from_whole_logits_byte_for_byte(monkeypatch, arch):
    """The teacher side's encoders (`Encoding.encoder`, fed one chunk of rows at a time as the head hands
    them over) store exactly the bytes `encode` stores from the whole [B, L, V] logits, every encoding, a
    chunk budget of 4 rows (records cut into several chunks, the last of 1 row), sampled draws included:
    first fed the rows of a real model's whole logits, then end to end through the model's head
    (`encode_head`) against `encode` on the logits the head made (the head's chunk matmuls may round
    differently from one (B·L, H) × (H, V) matmul: BLAS results depend on the row count)."""
    from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig

    from stablekd.data_pipeline import encodings
    from stablekd.data_pipeline.fidelity import PickedRows
    from stablekd.model.head import install_head
    from stablekd.objectives import lm

    Vt, rows, B, Lt = 90, 97, 3, 13  # tokenizer ids, embedding rows (padded), records, positions
    small = dict(
        vocab_size=rows, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    torch.manual_seed(0)
    config = (
        LlamaConfig(tie_word_embeddings=False, **small)
        if arch == "llama"
        else Gemma2Config(head_dim=16, num_key_value_heads=1, final_logit_softcapping=2.0, **small)
    )
    model = install_head(AutoModelForCausalLM.from_config(config).eval(), Vt)
    with torch.no_grad():
        torch.nn.init.normal_(model.get_output_embeddings().weight, std=0.5)  # spread-out distributions
    ids = torch.randint(0, Vt, (B, Lt))
    monkeypatch.setattr(lm, "CHUNK_ELEMENTS", 4 * Vt)  # 4 rows a chunk: 4 chunks a record, one of 1 row
    with torch.no_grad():
        whole = model(input_ids=ids).logits  # [B, L, V]: the reference path
    assert whole.shape == (B, Lt, Vt)

    def same(got: dict, want: dict, arm: dict) -> None:
        assert got.keys() == want.keys(), arm
        for name in want:
            assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, (arm, name)
            assert got[name].tobytes() == want[name].tobytes(), (arm, name)

    for arm in HEAD_ARMS:
        meta = soft_label_meta("c", "h", Vt, 0.7, Lt, **arm)
        enc = encodings.of(meta).encoder(B, Lt, Vt, 123)
        assert len(enc.slices) >= 3 * B and max(s.stop - s.start for s in enc.slices) <= 4  # several a record
        assert min(s.stop - s.start for s in enc.slices) == 1 or arm["encoding"] == "topk"
        for s in enc.slices:
            enc.add(whole.reshape(-1, Vt)[s], s)
        same(enc.result(), encode(whole, meta, 123), arm)

        made = PickedRows(torch.arange(B * Lt))  # every row the head makes, as it makes them
        with torch.no_grad():
            got = encodings.encode_head(
                lambda hl: model(input_ids=ids, head_loss=hl), (B, Lt), meta, 123, made.observe
            )
        assert torch.allclose(made.rows, whole.reshape(-1, Vt), rtol=1e-5, atol=1e-6)
        same(got, encode(made.rows.reshape(B, Lt, Vt), meta, 123), arm)
