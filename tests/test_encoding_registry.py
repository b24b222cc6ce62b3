"""The soft-label encoding registry (data_pipeline/encoding_registry.py, read through encodings.py): an
encoding defined and registered only in this file goes through the meta builder, the writer, shards, the
reader, the decoded stream, the loss and the fidelity measure with no other file knowing it; the config's
encoding keys are the registry's, with the defaults that stage hashes were made with."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stablekd.data_pipeline import encodings
from stablekd.data_pipeline.errors import ConfigError
from stablekd.data_pipeline.fidelity import fidelity
from stablekd.data_pipeline.logprobs import compress
from stablekd.data_pipeline.shards.format import ShardError
from stablekd.data_pipeline.shards.loader import ShardLoader
from stablekd.data_pipeline.soft_labels import (
    SoftLabelWriter,
    finalize_soft_labels,
    soft_label_meta,
    soft_label_reader,
)
from stablekd.objectives.kd import kd_sum, soft_label_teacher

V, L, T = 50, 6, 2.0
WIDTH = encodings.Param("width", 3, "toy: ids per token", lambda v: v >= 1, "an integer >= 1")


class Toy(encodings.Encoding):
    """Top `width` ids as int32 and their log-probs as float32: nothing rounded, so what the reader gives
    back is exactly the teacher's top entries."""

    name = "toy"
    summary = "width ids + float32 log-probs"
    params = (WIDTH,)

    @classmethod
    def check(cls, params, vocab_size=None) -> None:
        if vocab_size is not None and params["width"] > vocab_size:
            raise ConfigError(f"width: at most vocab_size ({vocab_size}), got {params['width']}")

    def arrays(self) -> encodings.Arrays:
        shape = (self.seq_len, self.meta["width"])
        return {"toy_ids": (np.dtype(np.int32), shape), "toy_logprobs": (np.dtype(np.float32), shape)}

    def encode(self, logits: torch.Tensor, seed: int) -> dict[str, np.ndarray]:
        lp, ids = (logits.float() / self.meta["temperature"]).log_softmax(-1).topk(self.meta["width"], dim=-1)
        return {"toy_ids": ids.to(torch.int32).cpu().numpy(), "toy_logprobs": lp.cpu().numpy()}

    def decode(self, batch) -> dict[str, torch.Tensor]:
        return {"topk_ids": batch["toy_ids"], "topk_logprobs": batch["toy_logprobs"]}


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(encodings.REGISTRY, Toy.name, Toy)  # registered for this test only
    return Toy


def test_an_encoding_registered_in_one_place_round_trips_through_writer_and_reader(tmp_path, toy):
    meta = soft_label_meta("teacher/ckpt/step1", "h", V, T, L, "toy", width=4)
    assert {k: meta[k] for k in ("encoding", "width", "logprob_bits")} == {
        "encoding": "toy", "width": 4, "logprob_bits": encodings.LOGPROB_BITS.default,
    }  # fmt: skip
    assert "k" not in meta and "draws" not in meta  # other encodings' parameters stay out of its meta
    with pytest.raises(ConfigError, match=r"width: expected an integer >= 1, got 0"):
        soft_label_meta("c", "h", V, T, L, "toy", width=0)  # the Param's range
    with pytest.raises(ConfigError, match=r"width: at most vocab_size \(50\)"):
        soft_label_meta("c", "h", V, T, L, "toy", width=51)  # the encoding's own check

    torch.manual_seed(0)
    logits, ids = torch.randn(5, L, V) * 2, torch.randint(0, V, (5, L))
    w = SoftLabelWriter(tmp_path, 0, meta, records_per_shard=2)
    w.add_logits(ids[:3], logits[:3])
    w.add_logits(ids[3:], logits[3:])
    w.close()
    manifest = finalize_soft_labels(tmp_path, 1)
    assert manifest["schema"]["toy_logprobs"] == {"dtype": "float32", "shape": [L, 4]}
    assert manifest["meta"]["bytes_per_token"] > encodings.record_bytes(meta) / L  # + safetensors headers

    expect = {"encoding": "toy", "width": 4, "temperature": T}
    reader = soft_label_reader(tmp_path, expect)
    (batch,) = list(encodings.Decoded(ShardLoader(reader, 5), meta))
    top_ids, top_lp = compress(logits, 4, T)
    assert torch.equal(batch["input_ids"], ids.to(torch.int32))
    assert torch.equal(batch["topk_ids"].long(), top_ids) and torch.equal(batch["topk_logprobs"], top_lp)

    # The losses take it as top-k entries (its decoded form), every kind.
    student, labels = torch.randn(5, L, V, dtype=torch.float64), ids
    for kind in ("fkl", "rkl"):
        got = kd_sum(student, soft_label_teacher(batch), labels, kind, T)[0]
        assert float(got) == pytest.approx(float(kd_sum(student, (top_ids, top_lp), labels, kind, T)[0]))
    f = fidelity(logits[:2], meta)
    assert f["tokens"] == 2 * L and 0 < f["topk_mass"] < 1 and f["kl"] > 0

    with pytest.raises(ShardError, match="width"):  # a reader expecting other parameters refuses the set
        soft_label_reader(tmp_path, {**expect, "width": 3})


def test_an_encoding_with_only_encode_is_fed_to_the_teacher_side_by_whole_records(toy, monkeypatch):
    """The teacher side (encodings.encode_head) hands an encoding its logits one chunk at a time; one that
    only implements `encode` gets whole records, as many as the chunk budget holds (at least one), each
    group with the seed of its first record: the arrays `encode` makes of the whole batch."""
    from stablekd.objectives import lm

    meta = soft_label_meta("c", "h", V, T, L, "toy", width=4)
    monkeypatch.setattr(lm, "CHUNK_ELEMENTS", 2 * L * V)  # two records a chunk
    logits = torch.randn(5, L, V, generator=torch.Generator().manual_seed(2))
    enc = encodings.of(meta).encoder(5, L, V, 9)
    assert [(s.start, s.stop) for s in enc.slices] == [(0, 2 * L), (2 * L, 4 * L), (4 * L, 5 * L)]
    for s in enc.slices:
        enc.add(logits.reshape(-1, V)[s], s)
    got, want = enc.result(), encodings.encode(logits, meta, 9)
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes() for k in want)
    monkeypatch.setattr(lm, "CHUNK_ELEMENTS", 1)  # a record over the budget: one record a chunk
    assert len(encodings.of(meta).encoder(5, L, V, 9).slices) == 5


def test_the_config_keys_of_the_encodings_are_the_registry_with_the_hashed_defaults():
    """Stage hashes count only values that differ from the defaults (launcher/config: changed), so a default
    changed in the registry would change what a resumed run computes under the same hash: these stay, or
    HASH_SCHEMA is bumped and this list with it."""
    from stablekd.launcher.config import keys, load_config

    got = {key.removeprefix("soft_labels."): (default, about) for key, _, default, about in keys()}
    assert got["encoding"] == (encodings.DEFAULT, encodings.describe())
    for p in encodings.parameters():
        assert got[p.name] == (p.default, p.help), p.name
    hashed = {
        "encoding": "sampled", "k": 32, "mass": 0.9, "mean_entries": 8, "draws": 8,
        "proposal_temperature": 0.0, "logprob_bits": 8,
    }  # fmt: skip
    assert {key: got[key][0] for key in hashed} == hashed
    # Each key's own range is checked whatever the encoding; what an encoding cannot store, with it.
    with pytest.raises(ConfigError, match="soft_labels.draws: expected an integer >= 1, got 0"):
        load_config(None, ["soft_labels.encoding=topk", "soft_labels.draws=0"])
    with pytest.raises(ConfigError, match="soft_labels.draws: at most 255 with encoding sampled"):
        load_config(None, ["soft_labels.draws=256"])
    assert load_config(None, ["soft_labels.encoding=topk", "soft_labels.draws=256"]).soft_labels.draws == 256
