import json
import pickle
import random
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from stablekd.data_pipeline.sources import Corpus, DataError, SourceStats, iter_documents
from stablekd.data_pipeline.stream import PackedStream, StreamLoader, eval_batches
from stablekd.data_pipeline.tokenizer import encode, load_tokenizer, train_tokenizer

WORDS = "the a cat dog sat ran on under mat log red blue quick slow bird fish tree house".split()


def _lines(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    # Unique prefix per line so "each document lands once" is checkable on token lists.
    return [f"doc{seed}x{i} " + " ".join(rng.choices(WORDS, k=rng.randint(1, 12))) for i in range(n)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_tokenizer(_lines(400, seed=0), vocab_size=300, out_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two files (txt + jsonl) in resolve order, and the documents they hold."""
    d = tmp_path_factory.mktemp("corpus")
    first, second = _lines(170, seed=1), _lines(130, seed=2)
    (d / "a.txt").write_text("\n".join(first) + "\n")
    (d / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in second))
    return [d / "a.txt", d / "b.jsonl"], first + second


def _shard_tokens(tok_dir, docs, shard, n_shards, seq_len):
    tok = load_tokenizer(tok_dir)
    ids = encode(tok, [d for i, d in enumerate(docs) if i % n_shards == shard])
    stream = [t for doc in ids for t in doc + [tok.eos_token_id]]
    return stream[: len(stream) // seq_len * seq_len]  # the final partial block is dropped


def _per_worker_streams(ds):
    """Token stream of each worker of one rank, through a real DataLoader as StreamLoader uses it."""
    out = {}
    for b in DataLoader(ds, batch_size=None, num_workers=ds.num_workers):
        assert torch.equal(b["input_ids"], b["labels"]) and b["input_ids"].dtype == torch.long
        assert b["input_ids"].shape[1] == ds.seq_len and 1 <= b["input_ids"].shape[0] <= ds.micro_batch_size
        out.setdefault(b["worker"], []).extend(b["input_ids"].flatten().tolist())
    return out


def test_shards_over_ranks_and_workers_are_disjoint_and_complete(tok_dir, corpus):
    files, docs = corpus
    world, workers = 2, 2
    n_shards = world * workers
    # Packing across document boundaries: each shard is exactly its documents' tokens, cut into blocks.
    for rank in range(world):
        ds = PackedStream(files, tok_dir, 16, 3, rank=rank, world_size=world, num_workers=workers, loop=False)
        streams = _per_worker_streams(ds)
        for w in range(workers):
            assert streams[w] == _shard_tokens(tok_dir, docs, rank * workers + w, n_shards, 16)

    # With seq_len 1 nothing is dropped, so the union of all shards must be exactly the documents, once each.
    tok = load_tokenizer(tok_dir)
    eos = tok.eos_token_id
    seen: Counter = Counter()
    for rank in range(world):
        ds = PackedStream(files, tok_dir, 1, 50, rank=rank, world_size=world, num_workers=workers, loop=False)
        for stream in _per_worker_streams(ds).values():
            assert stream[-1] == eos
            doc: list[int] = []
            for t in stream:
                if t == eos:
                    seen[tuple(doc)] += 1
                    doc = []
                else:
                    doc.append(t)
    assert seen == Counter(tuple(ids) for ids in encode(tok, docs))
    assert set(seen.values()) == {1}


def _take(loader, n):
    out = []
    for batch in loader:
        assert set(batch) == {"input_ids", "labels"}
        out.append(batch["input_ids"])
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_yields_exactly_the_uninterrupted_batches(tok_dir, corpus, num_workers):
    files, _ = corpus

    def make():
        return PackedStream(files, tok_dir, 32, 2, rank=1, world_size=2, num_workers=num_workers)

    total = 120  # ~1.7 epochs per worker: the resumes below straddle the epoch boundary
    reference = _take(StreamLoader(make()), total)

    resumed, state = [], None
    for cut in (7, 57, 96, total):  # odd cuts: with 2 workers the next batch is due from worker 1
        loader = StreamLoader(make())
        if state is not None:
            loader.load_state_dict(state)
        resumed += _take(loader, cut - len(resumed))
        state = json.loads(json.dumps(loader.state_dict()))  # it goes into a JSON checkpoint
        if cut == 57:
            assert {w["epoch"] for w in state["workers"].values()} == {0}
        if cut == 96:
            assert {w["epoch"] for w in state["workers"].values()} == {1}
            assert any(w["buffer"] for w in state["workers"].values())

    assert len(resumed) == total
    assert all(torch.equal(a, b) for a, b in zip(reference, resumed, strict=True))
    assert state["num_workers"] == num_workers and len(state["workers"]) == max(num_workers, 1)


def test_state_from_another_layout_is_refused(tok_dir, corpus):
    files, _ = corpus
    state = StreamLoader(PackedStream(files, tok_dir, 32, 2, num_workers=0)).state_dict()
    with pytest.raises(DataError, match=r"num_workers=0 but this run has num_workers=2"):
        StreamLoader(PackedStream(files, tok_dir, 32, 2, num_workers=2)).load_state_dict(state)
    with pytest.raises(DataError, match=r"world_size=1 but this run has world_size=2"):
        StreamLoader(PackedStream(files, tok_dir, 32, 2, rank=0, world_size=2)).load_state_dict(state)


def test_eval_batches_are_deterministic_per_rank(tok_dir, corpus):
    files, docs = corpus
    a = eval_batches(files, tok_dir, 16, 4, max_batches=5, rank=1, world_size=2)
    b = eval_batches(files, tok_dir, 16, 4, max_batches=5, rank=1, world_size=2)
    assert len(a) == 5 and all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))
    flat = torch.cat([x["input_ids"] for x in a]).flatten().tolist()
    assert flat == _shard_tokens(tok_dir, docs, 1, 2, 16)[: 5 * 4 * 16]
    other = eval_batches(files, tok_dir, 16, 4, max_batches=5, rank=0, world_size=2)
    assert not torch.equal(other[0]["input_ids"], a[0]["input_ids"])
    # More batches asked than the shard holds: all of it, the last batch short, nothing padded.
    everything = eval_batches(files, tok_dir, 16, 4, max_batches=10_000, rank=1, world_size=2)
    assert torch.cat([x["input_ids"] for x in everything]).flatten().tolist() == _shard_tokens(
        tok_dir, docs, 1, 2, 16
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stats_count_one_read_of_the_corpus(tok_dir, corpus, num_workers):
    files, _ = corpus
    expected = SourceStats()
    for _ in iter_documents(files, expected):
        pass
    stats = SourceStats()
    loader = StreamLoader(PackedStream(files, tok_dir, 32, 8, num_workers=num_workers, stats=stats))
    # The corpus is ~9k tokens, ~35 batches of 8 x 32: 60 batches pass the end more than once for every
    # worker, and later epochs must not add to the counts.
    _take(loader, 60)
    assert stats == expected


def test_misuse_is_reported(tok_dir, corpus, tmp_path):
    files, _ = corpus
    with pytest.raises(DataError, match="through StreamLoader"):
        next(iter(PackedStream(files, tok_dir, 32, 2, num_workers=2)))
    one = tmp_path / "one.txt"
    one.write_text("a single document\n")
    with pytest.raises(DataError, match=r"shard 1 of 2 .* gets no documents.* has 1 documents"):
        next(iter(PackedStream([one], tok_dir, 32, 2, rank=1, world_size=2)))
    ds = PackedStream(files, tok_dir, 32, 2)
    next(iter(ds))
    assert len(pickle.dumps(ds)) < 2_000  # the loaded tokenizer is not shipped to workers


def test_train_stream_and_eval_batches_read_disjoint_shares_of_the_same_files(tok_dir, corpus):
    files, docs = corpus
    train = Corpus(tuple(files), "line", "train", 0.3)
    held = Corpus(tuple(files), "line", "eval", 0.3)
    train_docs, held_docs = list(iter_documents(train)), list(iter_documents(held))
    assert sorted(train_docs + held_docs) == sorted(docs) and not set(train_docs) & set(held_docs)
    assert 50 < len(held_docs) < 130  # Binomial(300, 0.3): mean 90, sd 7.9
    for rank in range(2):
        # seq_len 1 keeps every token: each rank's stream is exactly its share of the training documents.
        ds = PackedStream(train, tok_dir, 1, 64, rank=rank, world_size=2, loop=False)
        got = [t for b in ds for t in b["input_ids"].flatten().tolist()]
        assert got == _shard_tokens(tok_dir, train_docs, rank, 2, 1)
        evals = eval_batches(held, tok_dir, 1, 64, 10_000, rank, 2)
        assert [t for b in evals for t in b["input_ids"].flatten().tolist()] == _shard_tokens(
            tok_dir, held_docs, rank, 2, 1
        )
    # No held-out share (fraction 0): no eval batch, so the caller reports no eval loss (never NaN).
    assert eval_batches(Corpus(tuple(files), "line", "eval", 0.0), tok_dir, 16, 4, 4, 0, 1) == []
