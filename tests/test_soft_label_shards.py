"""Shard/manifest mechanics with the soft-label and candidate formats (data_pipeline/{shards,soft_labels,candidates}.py)."""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as stnp
import torch

from stablekd.data_pipeline import candidates as cg
from stablekd.data_pipeline.encodings import id_dtype
from stablekd.data_pipeline.fidelity import fidelity, merge_fidelity
from stablekd.data_pipeline.logprobs import compress, tail_mass
from stablekd.data_pipeline.shards.format import ShardError
from stablekd.data_pipeline.shards.loader import ShardLoader
from stablekd.data_pipeline.shards.manifest import _ordered_prefix, finalize
from stablekd.data_pipeline.shards.reader import ShardReader
from stablekd.data_pipeline.shards.writer import ShardWriter
from stablekd.data_pipeline.soft_labels import (
    SoftLabelWriter,
    finalize_soft_labels,
    soft_label_meta,
    soft_label_reader,
)

L, K, V = 8, 4, 2000  # record ids (input_ids[:, 0]) go up to 1009
META = soft_label_meta(
    "teacher/step-10",
    "tok-abc123",
    vocab_size=V,
    temperature=2.0,
    seq_len=L,
    encoding="topk",
    k=K,
    logprob_bits=16,
)
EXPECT = {k: META[k] for k in ("tokenizer_hash", "vocab_size", "temperature", "k", "seq_len")}


def records(ids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Records whose content is a function of a unique id (input_ids[:, 0] = id)."""
    ids_ = np.asarray(ids, np.int64)
    input_ids = (ids_[:, None] + np.arange(L)[None, :]).astype(np.int32)  # [B, L]
    topk_ids = (ids_[:, None, None] + np.arange(L * K).reshape(1, L, K)) % V  # [B, L, K]
    logp = -np.arange(1, K + 1, dtype=np.float32)[None, None, :] - (ids_[:, None, None] % 7)  # [B, 1, K]
    return input_ids, topk_ids, np.broadcast_to(logp, (len(ids), L, K)).copy()


def write_rank(out: Path, rank: int, ids: list[int], world: int = 2, rps: int = 4, batch: int = 3) -> None:
    w = SoftLabelWriter(out, rank, META, records_per_shard=rps, world_size=world)
    for s in range(0, len(ids), batch):  # batches of 3 straddle the 4-record shard boundaries
        w.add_batch(*records(ids[s : s + batch]))
    w.close()


RANK_IDS = [list(range(0, 13)), list(range(1000, 1010))]  # 13 and 10 records: 4+4+4+1 and 4+4+2
ALL_IDS = sorted(RANK_IDS[0] + RANK_IDS[1])


@pytest.fixture()
def written(tmp_path: Path) -> Path:
    out = tmp_path / "soft_labels"
    for r, ids in enumerate(RANK_IDS):
        write_rank(out, r, ids)
    finalize_soft_labels(out, 2, {"topk_mass": 0.9, "kl": 0.01, "tokens": 10.0})
    return out


def ids_of(batches) -> list[int]:
    return [int(x) for b in batches for x in b["input_ids"][:, 0]]


def test_write_finalize_manifest_and_roundtrip(written: Path) -> None:
    m = json.loads((written / "manifest.json").read_text())
    assert m["kind"] == "soft_labels" and m["final"] is True and m["total_records"] == 23
    assert m["meta"]["fidelity"]["kl"] == 0.01 and m["meta"]["tokenizer_hash"] == "tok-abc123"
    # Global order: round-robin over writer ranks, (index, rank); rank 1 has no 4th shard.
    assert [(s["index"], s["rank"]) for s in m["shards"]] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
        (2, 0),
        (2, 1),
        (3, 0),
    ]
    assert [s["records"] for s in m["shards"]] == [4, 4, 4, 4, 4, 2, 1]
    assert sorted(p.name for p in written.glob("*.tmp")) == []

    recs = list(soft_label_reader(written, EXPECT))
    assert sorted(int(r["input_ids"][0]) for r in recs) == ALL_IDS
    r = recs[5]
    rid = int(r["input_ids"][0])
    exp_in, exp_ids, exp_lp = records([rid])
    assert r["topk_ids"].dtype == torch.int32 and r["topk_logprobs"].dtype == torch.float16
    assert r["input_ids"].shape == (L,) and r["topk_ids"].shape == (L, K)
    np.testing.assert_array_equal(r["input_ids"].numpy(), exp_in[0])
    np.testing.assert_array_equal(r["topk_ids"].numpy(), exp_ids[0])
    np.testing.assert_array_equal(r["topk_logprobs"].numpy(), exp_lp[0].astype(np.float16))
    # Storage dtype on disk is uint16 for V <= 65536.
    assert stnp.load_file(str(written / m["shards"][0]["file"]))["topk_ids"].dtype == np.uint16


def test_world2_workers2_disjoint_and_complete(written: Path) -> None:
    per_rank = []
    for rank in range(2):
        reader = soft_label_reader(written, EXPECT, rank=rank, world_size=2, num_workers=2)
        per_rank.append(ids_of(ShardLoader(reader, micro_batch_size=3)))
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == ALL_IDS  # every record exactly once
    # Stream c = rank*2 + worker takes ordinals j with j % 4 == c: rank 0 -> ordinals 0, 1, 4, 5.
    shard_sizes = [4, 4, 4, 4, 4, 2, 1]
    assert len(per_rank[0]) == sum(shard_sizes[j] for j in (0, 1, 4, 5))


def test_reader_resume_continues_exactly(written: Path) -> None:
    def loader() -> ShardLoader:
        return ShardLoader(
            soft_label_reader(written, EXPECT, rank=0, world_size=1, num_workers=2), micro_batch_size=3
        )

    full = ids_of(loader())
    first = loader()
    it = iter(first)
    head = [next(it), next(it)]  # an even count: the resumed DataLoader also starts with worker 0
    state = json.loads(json.dumps(first.state_dict()))  # as it travels through a checkpoint
    it.close()
    assert state["positions"][0][1] == 3  # mid-shard position

    resumed = loader()
    resumed.load_state_dict(state)
    assert ids_of(head) + ids_of(resumed) == full
    assert sorted(full) == ALL_IDS

    other = ShardLoader(
        soft_label_reader(written, EXPECT, rank=0, world_size=1, num_workers=1), micro_batch_size=3
    )
    with pytest.raises(ShardError, match=r"num_workers=2.*num_workers=1"):
        other.load_state_dict(state)
    other = ShardLoader(
        soft_label_reader(written, EXPECT, rank=0, world_size=2, num_workers=2), micro_batch_size=3
    )
    with pytest.raises(ShardError, match=r"world_size=1.*world_size=2"):
        other.load_state_dict(state)


def test_writer_resume_after_kill(tmp_path: Path) -> None:
    out = tmp_path / "sl"
    w = SoftLabelWriter(out, 0, META, records_per_shard=4, world_size=1)
    w.add_batch(*records(list(range(10))))  # 2 shards committed, 2 records buffered
    assert w.records_written == 8
    del w  # killed: no close()
    # What a kill can leave: a half-written shard temp, a half-written manifest temp, and a complete
    # shard renamed into place whose manifest update never happened.
    (out / "shard-r000-000002.safetensors.tmp").write_bytes(b"\x00" * 50)
    (out / "manifest.r000.json.tmp").write_text('{"format_version": 1, "shards": [')
    shutil.copy(out / "shard-r000-000000.safetensors", out / "shard-r000-000002.safetensors")

    bad = dict(META, temperature=1.0)
    with pytest.raises(ShardError, match=r"manifest\.r000\.json.*'temperature'.*2\.0.*1\.0"):
        SoftLabelWriter(out, 0, bad, records_per_shard=4, world_size=1)

    w = SoftLabelWriter(out, 0, META, records_per_shard=4, world_size=1)
    assert w.records_written == 8
    assert not list(out.glob("*.tmp")) and not (out / "shard-r000-000002.safetensors").exists()
    w.add_batch(*records(list(range(w.records_written, 13))))
    w.close()
    m = finalize(out, 1)
    assert m["total_records"] == 13 and [s["records"] for s in m["shards"]] == [4, 4, 4, 1]
    assert sorted(int(r["input_ids"][0]) for r in soft_label_reader(out, EXPECT)) == list(range(13))
    # A final rank reopens fine (nothing to redo) but refuses more records.
    w = SoftLabelWriter(out, 0, META, records_per_shard=4, world_size=1)
    assert w.records_written == 13
    with pytest.raises(ShardError, match="already final"):
        w.add_batch(*records([99]))


def test_truncated_and_flipped_shards_raise(written: Path) -> None:
    m = json.loads((written / "manifest.json").read_text())
    path = written / m["shards"][2]["file"]
    good = path.read_bytes()

    path.write_bytes(good[:-10])
    with pytest.raises(ShardError, match=rf"{path.name}.*truncated"):
        list(soft_label_reader(written, EXPECT))

    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(ShardError, match=rf"{path.name}.*sha256.*corrupted"):
        list(soft_label_reader(written, EXPECT))

    path.unlink()
    with pytest.raises(ShardError, match=rf"{path.name}.*missing"):
        list(soft_label_reader(written, EXPECT))


@pytest.mark.parametrize(
    ("key", "wrong", "have"),
    [("tokenizer_hash", "tok-other", "'tok-abc123'"), ("k", 8, "4"), ("temperature", 1.0, "2.0")],
)
def test_manifest_mismatch_names_key_and_values(written: Path, key: str, wrong, have: str) -> None:
    with pytest.raises(ShardError) as e:
        soft_label_reader(written, dict(EXPECT, **{key: wrong}))
    msg = str(e.value)
    assert "manifest.json" in msg and f"'{key}'" in msg and have in msg and repr(wrong) in msg
    with pytest.raises(ShardError, match=r"kind is 'soft_labels'.*'candidates'"):
        cg.candidate_reader(written)


def test_finalize_refuses_unfinished_rank(tmp_path: Path) -> None:
    out = tmp_path / "sl"
    write_rank(out, 0, [1, 2, 3])
    w = SoftLabelWriter(out, 1, META, records_per_shard=4, world_size=2)
    w.add_batch(*records([7]))
    with pytest.raises(ShardError, match=r"manifest\.r001\.json.*not final"):
        finalize(out, 2)
    with pytest.raises(ShardError, match=r"manifest\.json: missing"):
        soft_label_reader(out, EXPECT)  # not follow mode: needs the final manifest
    with pytest.raises(ShardError, match="outside world_size"):
        SoftLabelWriter(out, 1, META, records_per_shard=4)  # world_size forgotten


def test_ordering_rule_waits_for_unsettled_slots() -> None:
    def rank(r: int, n: int, final: bool) -> dict:
        return {"shards": [{"rank": r, "index": i} for i in range(n)], "final": final}

    order = lambda ms: [(s["index"], s["rank"]) for s in _ordered_prefix(ms)]  # noqa: E731
    assert order([rank(0, 2, False), None]) == [(0, 0)]  # rank 1 may still write its shard 0
    assert order([rank(0, 2, False), rank(1, 0, True)]) == [(0, 0), (1, 0)]
    assert order([rank(0, 3, True), rank(1, 1, False)]) == [(0, 0), (0, 1), (1, 0)]
    assert order([rank(0, 3, True), rank(1, 1, True)]) == [(0, 0), (0, 1), (1, 0), (2, 0)]


def test_follow_mode_reads_while_writing(tmp_path: Path) -> None:
    out = tmp_path / "sl"
    seen_first = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            ws = [SoftLabelWriter(out, r, META, records_per_shard=2, world_size=2) for r in range(2)]
            for step in range(5):  # rank 1 writes one record less per step: uneven shard counts
                for r, w in enumerate(ws):
                    w.add_batch(*records([r * 1000 + step * 3 + i for i in range(3 - r)]))
                if step == 0:
                    assert seen_first.wait(10), "reader did not pick up the first shards"
                time.sleep(0.01)
            for w in ws:
                w.close()
            finalize_soft_labels(out, 2, {"kl": 0.0})
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)

    reader = soft_label_reader(out, EXPECT, follow=True, poll_s=0.005, timeout_s=10)
    t = threading.Thread(target=writer)
    t.start()
    got = []
    for rec in reader:
        got.append(int(rec["input_ids"][0]))
        seen_first.set()
    t.join()
    assert not errors, errors
    assert (out / "manifest.json").exists()
    expected = [r * 1000 + s * 3 + i for r in range(2) for s in range(5) for i in range(3 - r)]
    assert sorted(got) == sorted(expected)
    # Same order as a plain read of the finished set: follow mode does not change the ordinals.
    assert got == [int(r["input_ids"][0]) for r in soft_label_reader(out, EXPECT)]

    # Nothing new for timeout_s -> ShardError.
    stalled = tmp_path / "stalled"
    SoftLabelWriter(stalled, 0, META, records_per_shard=2, world_size=1)
    with pytest.raises(ShardError, match="nothing new committed"):
        list(soft_label_reader(stalled, EXPECT, follow=True, poll_s=0.01, timeout_s=0.1))


def test_compress_and_fidelity_by_hand() -> None:
    T, k = 2.0, 2
    # softmax(logits / T) = p exactly when logits = T * log p.
    p = torch.tensor([[0.4, 0.3, 0.1, 0.1, 0.1], [0.15, 0.5, 0.06, 0.25, 0.04]], dtype=torch.float64)
    logits = (T * p.log()).float()
    ids, lp = compress(logits, k, T)
    assert ids.tolist() == [[0, 1], [1, 3]]
    assert lp.dtype == torch.float32
    torch.testing.assert_close(
        lp.double(), torch.tensor([[0.4, 0.3], [0.5, 0.25]]).log().double(), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(tail_mass(lp), torch.tensor([0.3, 0.25]), atol=1e-6, rtol=0)

    # Row 0: tail 0.3 over 3 ids = 0.1 each = p, so KL = 0.
    # Row 1: tail 0.25 over 3 ids -> q = 1/12 on ids 0, 2, 4:
    #   KL = 0.15 ln(0.15*12) + 0.06 ln(0.06*12) + 0.04 ln(0.04*12)
    kl1 = 0.15 * math.log(1.8) + 0.06 * math.log(0.72) + 0.04 * math.log(0.48)
    meta = {"encoding": "topk", "k": k, "temperature": T, "vocab_size": 5}
    f = fidelity(logits, meta)
    assert f["tokens"] == 2.0
    assert f["topk_mass"] == pytest.approx((0.7 + 0.75) / 2, abs=1e-6)
    assert f["topk_mass_min"] == pytest.approx(0.7, abs=1e-6)
    assert f["kl"] == pytest.approx(kl1 / 2, abs=1e-4)  # from the float16-stored log-probs
    assert fidelity(logits[1:], meta)["kl"] == pytest.approx(kl1, abs=1e-4)
    whole = fidelity(logits, {**meta, "k": 5})  # k == V loses nothing
    assert whole["kl"] == pytest.approx(0.0, abs=1e-3) and whole["topk_mass"] == pytest.approx(1.0)
    merged = merge_fidelity([fidelity(logits[:1], meta), fidelity(logits[1:], meta)])
    assert merged["kl"] == pytest.approx(f["kl"]) and merged["tokens"] == 2.0
    # Leading dims [B, L, V] keep their shape; chunking does not change the result.
    big = torch.randn(3, 7, 11)
    ids3, lp3 = compress(big, 4, 1.5, chunk=5)
    ref = torch.log_softmax(big / 1.5, -1).topk(4, -1)
    assert ids3.shape == (3, 7, 4) and torch.equal(ids3, ref.indices) and torch.allclose(lp3, ref.values)


def test_topk_dtype_boundary(tmp_path: Path) -> None:
    assert id_dtype(65536) == np.uint16 and id_dtype(65537) == np.int32 and id_dtype(32000) == np.uint16
    for vocab, top_id, stored in ((65536, 65535, np.uint16), (65537, 65536, np.int32)):
        meta = soft_label_meta("t", "h", vocab, 1.0, 2, "topk", k=1, logprob_bits=16)
        out = tmp_path / f"v{vocab}"
        w = SoftLabelWriter(out, 0, meta, records_per_shard=4)
        w.add_batch(np.zeros((1, 2)), np.full((1, 2, 1), top_id), np.zeros((1, 2, 1)))
        with pytest.raises(ShardError, match="outside"):
            w.add_batch(np.zeros((1, 2)), np.full((1, 2, 1), vocab), np.zeros((1, 2, 1)))
        w.close()
        m = finalize(out, 1)
        assert stnp.load_file(str(out / m["shards"][0]["file"]))["topk_ids"].dtype == stored
        (rec,) = soft_label_reader(out, {"vocab_size": vocab})
        assert rec["topk_ids"].dtype == torch.int32 and int(rec["topk_ids"][0, 0]) == top_id


def test_add_logits_and_fp16_clip(tmp_path: Path) -> None:
    meta = soft_label_meta("t", "h", 6, 1.0, 2, "topk", k=3, logprob_bits=16)
    w = SoftLabelWriter(tmp_path / "a", 0, meta, records_per_shard=4)
    logits = torch.tensor(
        [[[0.0, 1.0, 2.0, -float("inf"), -float("inf"), -float("inf")], [3.0, 0, 0, 0, 0, 0]]]
    )
    w.add_logits(torch.tensor([[5, 4]]), logits)
    w.add_batch(np.zeros((1, 2)), np.zeros((1, 2, 3)), np.full((1, 2, 3), -np.inf))  # -inf clipped
    w.close()
    finalize_soft_labels(tmp_path / "a", 1, fidelity(logits, meta))
    recs = list(soft_label_reader(tmp_path / "a", {"k": 3}))
    assert recs[0]["topk_ids"][0].tolist() == [2, 1, 0] and torch.isfinite(recs[1]["topk_logprobs"]).all()
    # by hand, k=3, T=1: row 0 has all its mass on 3 ids (mass 1); row 1 is [3, 0 x 5]: top-3 mass
    # (e^3 + 2) / (e^3 + 5), and both tails are flat (or empty), so KL(p || q) is 0 up to float16 rounding
    e3 = math.exp(3.0)
    f = json.loads((tmp_path / "a" / "manifest.json").read_text())["meta"]["fidelity"]
    assert f["tokens"] == 2.0 and f["kl"] == pytest.approx(0.0, abs=1e-3)
    assert f["topk_mass"] == pytest.approx((1.0 + (e3 + 2) / (e3 + 5)) / 2, rel=1e-6)
    assert f["topk_mass_min"] == pytest.approx((e3 + 2) / (e3 + 5), rel=1e-6)


def test_candidates_roundtrip_and_layout(tmp_path: Path) -> None:
    meta = cg.candidate_meta(
        "t", "h", vocab_size=50, m=2, max_new_tokens=3, temperature=1.0, top_p=0.9, ctx_len=4, gold=True
    )
    assert cg.group_size(meta) == 3
    contexts = [[11, 12], [1, 2, 3, 4, 5]]  # the second is cut to its last 4 tokens
    groups = [[[20], [21, 22, 23, 24], [30, 31]], [[40, 41], [42], [43, 44, 45]]]
    packed = cg.pack_groups(contexts, groups, ctx_len=4, max_new_tokens=3)
    assert packed["context_ids"].tolist() == [[0, 0, 11, 12], [2, 3, 4, 5]]
    assert packed["cand_len"].tolist() == [[1, 3, 2], [2, 1, 3]]

    out = tmp_path / "candidates"
    w = cg.CandidateWriter(out, 0, meta, records_per_shard=1)
    w.add_groups(**packed)
    with pytest.raises(ShardError, match="cand_len"):
        w.add_groups(**dict(packed, cand_len=np.zeros((2, 3), np.int32)))
    w.close()
    finalize(out, 1)
    with pytest.raises(ShardError, match=r"'top_p'.*0\.9.*0\.95"):
        cg.candidate_reader(out, {"top_p": 0.95})
    batch = next(iter(ShardLoader(cg.candidate_reader(out, {"m": 2, "gold": True}), micro_batch_size=2)))
    lay = cg.candidate_batch(batch)
    assert lay["input_ids"].shape == (2, 3, 7)
    assert lay["input_ids"][0, 1].tolist() == [0, 0, 11, 12, 21, 22, 23]
    assert lay["attention_mask"][0, 0].tolist() == [0, 0, 1, 1, 1, 0, 0]
    assert lay["position_ids"][0, 0].tolist()[2:5] == [0, 1, 2]
    assert lay["cont_mask"][1, 1].tolist() == [False] * 4 + [True, False, False]
    assert lay["labels"][0, 2].tolist() == [-100] * 4 + [30, 31, -100]

    cand, n = cg.trim_generated(torch.tensor([[5, 3, 7, 8], [5, 6, 7, 8]]), eos_id=3, max_new_tokens=4)
    assert cand.tolist() == [[5, 3, 0, 0], [5, 6, 7, 8]] and n.tolist() == [2, 4]


def test_generic_writer_context_manager_and_schema(tmp_path: Path) -> None:
    out = tmp_path / "generic"
    with pytest.raises(RuntimeError), ShardWriter(out, 0, "toy", {"v": 1}, records_per_shard=2) as w:
        w.add(x=np.arange(3, dtype=np.int64), y=np.zeros((3, 2), np.float32))
        raise RuntimeError("killed")  # an error must not mark the rank final
    assert json.loads((out / "manifest.r000.json").read_text())["final"] is False
    with ShardWriter(out, 0, "toy", {"v": 1}, records_per_shard=2) as w:
        assert w.records_written == 2
        with pytest.raises(ShardError, match="schema"):
            w.add(x=np.arange(2, dtype=np.int32), y=np.zeros((2, 2), np.float32))
        w.add(x=np.arange(2, 5, dtype=np.int64), y=np.ones((3, 2), np.float32))
    finalize(out, 1)
    got = [int(r["x"]) for r in ShardReader(out, "toy", {"v": 1})]
    assert got == [0, 1, 2, 3, 4]


def test_resume_after_an_odd_number_of_batches_keeps_the_worker_order(written: Path) -> None:
    """With 2 workers the DataLoader asks worker 0 first; a state saved after an odd number of batches
    is due at worker 1, and the resumed loader must start there (ShardLoader's `next_worker`)."""

    def loader() -> ShardLoader:
        return ShardLoader(
            soft_label_reader(written, EXPECT, rank=0, world_size=1, num_workers=2), micro_batch_size=3
        )

    full = ids_of(loader())
    first = loader()
    it = iter(first)
    head = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))
    it.close()
    assert state["next_worker"] == 1
    resumed = loader()
    resumed.load_state_dict(state)
    assert ids_of(head) + ids_of(resumed) == full


def test_follow_timeout_names_the_shard_it_waits_for(tmp_path: Path) -> None:
    out = tmp_path / "soft_labels"
    write_rank(out, 0, list(range(8)), rps=4)  # rank 0: two shards, final
    SoftLabelWriter(out, 1, META, records_per_shard=4, world_size=2)  # rank 1: started, nothing committed
    reader = soft_label_reader(out, EXPECT, rank=0, world_size=1, follow=True, poll_s=0.05, timeout_s=0.3)
    t0 = time.monotonic()
    with pytest.raises(ShardError, match=r"waiting for shard-r001-000000\.safetensors"):
        list(ShardLoader(reader, micro_batch_size=2))
    assert time.monotonic() - t0 < 5


def test_equal_epochs_repeat_and_resume_mid_epoch(written: Path) -> None:
    from stablekd.data_pipeline.epochs import EqualEpochs

    def epochs() -> EqualEpochs:
        return EqualEpochs(ShardLoader(soft_label_reader(written, EXPECT), micro_batch_size=5), str(written))

    it = iter(epochs())
    stream = [next(it) for _ in range(12)]  # 23 records in batches of 5: 5 batches per epoch
    assert ids_of(stream[:5]) == ids_of(stream[5:10]) and sorted(ids_of(stream[:5])) == ALL_IDS
    first = epochs()
    it = iter(first)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["epoch"] == 1 and state["drawn"] == 2
    resumed = epochs()
    resumed.load_state_dict(state)
    rit = iter(resumed)
    assert ids_of([next(rit) for _ in range(5)]) == ids_of(stream[7:12])
