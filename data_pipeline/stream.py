"""Streaming tokenize + pack into fixed-length blocks, sharded over (rank, dataloader worker), resumable.

Corpus order is `resolve_paths` order and documents are numbered 0, 1, ... across all files, per epoch
(documents of the stream's `Corpus`: its text unit, and only its split, so a train stream never sees the
held-out share and an eval stream sees nothing else).
With W = max(num_workers, 1) the stream has S = world_size * W shards; shard s = rank * W + worker owns
the documents with index % S == s. Each shard concatenates its documents, each followed by EOS, and cuts
consecutive `seq_len` blocks (documents span block boundaries). Example: world 2 x 2 workers, seq_len
128, micro batch 4 -> 4 shards, each yields [4, 128] batches; one optimizer micro-step per rank reads
4 * 128 = 512 tokens from one worker of that rank.

Every shard reads the whole corpus (to count document indices) but tokenizes only its own documents;
tokenizing dominates, so the extra reading is cheap next to it.

Labels: a token's own id where it is learned, -100 where it is context (the prompt of a task record,
data_pipeline/tasks.py); a plain document is learned throughout. The EOS after a document is learned when
its last token is.

Resume position per worker: {"epoch", "doc_index" (next global index to consider), "buffer" (tokens
carried over), "labels" (their labels; absent = the tokens themselves)}. The buffer holds at most the untaken tail of one document, because documents after it
are re-read and re-tokenized on resume rather than stored.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stablekd.data_pipeline.errors import DataError
from stablekd.data_pipeline.sources import Corpus, SourceStats, as_corpus, read_documents
from stablekd.data_pipeline.tasks import Document, encode_documents
from stablekd.data_pipeline.tokenizer import load_tokenizer
from stablekd.objectives.lm import IGNORE_INDEX

_TOKENIZE_BATCH = 64  # documents per tokenizer call: amortises the call, keeps memory small


@dataclass
class _Segment:
    """One document's tokens (+EOS) in the packing buffer, or the carried-over buffer of a resumed state."""

    tokens: list[int]
    labels: list[int]  # tokens, with IGNORE_INDEX where a token is context, not learned
    epoch: int
    index: int | None  # global document index; None for a resumed buffer (not a whole document)
    after: tuple[int, int]  # (epoch, doc_index) right after this segment


def _merge_max(dst: SourceStats, src: dict[str, int]) -> None:
    # Every reader counts its own full read of the same corpus, so the furthest count is the corpus count
    # so far; taking the max (not the sum) keeps repeated iterations and many workers from multiplying it.
    for key, value in src.items():
        setattr(dst, key, max(getattr(dst, key), value))


def _fresh_state() -> dict[str, Any]:
    return {"epoch": 0, "doc_index": 0, "buffer": []}


class PackedStream(IterableDataset):
    """Yields micro-batches dict(input_ids=[B, seq_len] long, labels=[B, seq_len] long, worker=int,
    state=dict) (+ stats=dict when `stats` is given). `labels` equals `input_ids` except at the context
    tokens of task records (-100); the HF model shifts them.

    loop=True repeats the corpus (epoch in the state) and always yields full batches. loop=False stops
    after the last document; its last batch may have fewer than B rows, and only the final partial
    block (< seq_len tokens) is dropped.

    With num_workers > 0 iterate it through `StreamLoader` (a DataLoader): the worker id picks the shard.
    `stats` ends up holding the counts of one full read of the corpus (complete once a reader has passed
    the end of it). With workers the reading happens in worker processes and `StreamLoader` copies their
    counts back into this object as batches arrive, so a non-looping stream read through workers may miss
    the lines read after its last batch.
    """

    def __init__(
        self,
        files: Corpus | Sequence[Path],
        tokenizer_dir: str | Path,
        seq_len: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        loop: bool = True,
        stats: SourceStats | None = None,
    ) -> None:
        super().__init__()
        if seq_len < 1 or micro_batch_size < 1:
            raise DataError(f"seq_len ({seq_len}) and micro_batch_size ({micro_batch_size}) must be >= 1")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        if num_workers < 0:
            raise DataError(f"num_workers must be >= 0, got {num_workers}")
        self.corpus = as_corpus(files)  # a plain file list: one document per line, every document
        self.files = list(self.corpus.files)
        self.tokenizer_dir = str(tokenizer_dir)
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.loop = loop
        self.stats = stats
        self._resume: dict[str, dict[str, Any]] = {}
        self._next_worker = 0
        self._tok = None

    def __getstate__(self) -> dict[str, Any]:
        # Workers load their own tokenizer; pickling one in would cost time and memory per worker.
        state = self.__dict__.copy()
        state["_tok"] = None
        return state

    @property
    def shards_per_rank(self) -> int:
        return max(self.num_workers, 1)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from a `StreamLoader.state_dict()`; each worker continues from its own entry."""
        for key, mine in (
            ("world_size", self.world_size),
            ("num_workers", self.num_workers),
            ("rank", self.rank),
        ):
            if state.get(key) != mine:
                raise DataError(
                    f"data stream state was saved with {key}={state.get(key)} but this run has {key}={mine}: "
                    "the shard positions cannot be mapped exactly (keep world_size and data num_workers "
                    "when resuming, and give each rank its own state)"
                )
        workers = state.get("workers", {})
        for wid, ws in workers.items():
            if not (str(wid).isdigit() and int(wid) < self.shards_per_rank):
                raise DataError(
                    f"data stream state names worker {wid!r}; this run has {self.num_workers} workers"
                )
            if not (isinstance(ws, dict) and {"epoch", "doc_index", "buffer"} <= ws.keys()):
                raise DataError(
                    f"data stream state for worker {wid} is {ws!r}; expected keys epoch, doc_index, buffer"
                )
        self._resume = copy.deepcopy({str(k): v for k, v in workers.items()})
        self._next_worker = int(state.get("next_worker", 0)) % self.shards_per_rank

    def _tokenizer(self):
        if self._tok is None:
            self._tok = load_tokenizer(self.tokenizer_dir)
        return self._tok

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is None:
            if self.num_workers > 0:
                raise DataError(
                    f"PackedStream with num_workers={self.num_workers} must be iterated through StreamLoader "
                    "(the DataLoader worker id selects the shard)"
                )
            worker = 0
        else:
            if info.num_workers != self.shards_per_rank:
                raise DataError(
                    f"PackedStream was built for num_workers={self.num_workers} but the DataLoader runs "
                    f"{info.num_workers} workers"
                )
            # The DataLoader always asks its process 0 first; rotating the ids makes the worker that
            # was due next at save time come first after a resume, so the batch order is unchanged.
            worker = (info.id + self._next_worker) % info.num_workers
        return self._batches(worker)

    def _documents(
        self, shard: int, n_shards: int, epoch: int, start: int, stats: SourceStats
    ) -> Iterator[list[_Segment]]:
        """This shard's documents from (epoch, start) on, tokenized in small batches."""
        tok = self._tokenizer()
        eos = tok.eos_token_id

        def tokenize(pending: list[tuple[int, Document]], e: int) -> list[_Segment]:
            out = []
            for (i, _), (ids, learned) in zip(
                pending, encode_documents(tok, [d for _, d in pending]), strict=True
            ):
                labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, learned, strict=True)]
                end = eos if not learned or learned[-1] else IGNORE_INDEX
                out.append(_Segment(ids + [eos], labels + [end], e, i, (e, i + 1)))
            return out

        while True:
            pending: list[tuple[int, Document]] = []
            owned = total = 0
            for i, doc in enumerate(read_documents(self.corpus, stats)):
                total += 1
                if i < start or i % n_shards != shard:
                    continue
                owned += 1
                pending.append((i, doc))
                if len(pending) == _TOKENIZE_BATCH:
                    yield tokenize(pending, epoch)
                    pending = []
            if pending:
                yield tokenize(pending, epoch)
            stats = SourceStats()  # count the first full read only, not once per epoch
            if not self.loop:
                return
            if start == 0 and owned == 0:
                # Looping would spin forever without yielding a batch.
                raise DataError(
                    f"shard {shard} of {n_shards} (world_size {self.world_size} x {self.shards_per_rank} "
                    f"worker(s)) gets no documents: the corpus ({len(self.files)} files) has {total} "
                    f"documents ({self.corpus.split} split, text_unit {self.corpus.text_unit}); use fewer "
                    "ranks/workers or more data"
                )
            epoch, start = epoch + 1, 0

    def _batches(self, worker: int) -> Iterator[dict[str, Any]]:
        n_shards = self.world_size * self.shards_per_rank
        shard = self.rank * self.shards_per_rank + worker
        st = self._resume.get(str(worker), _fresh_state())
        L, B = self.seq_len, self.micro_batch_size
        segs: deque[_Segment] = deque()
        offset = 0  # tokens of segs[0] already cut into blocks
        avail = 0  # tokens in segs not yet cut
        consumed = (int(st["epoch"]), int(st["doc_index"]))  # position after the last fully cut segment
        if st["buffer"]:
            labels = list(st.get("labels", st["buffer"]))
            segs.append(_Segment(list(st["buffer"]), labels, consumed[0], None, consumed))
            avail = len(st["buffer"])
        read_stats = SourceStats()
        chunks = self._documents(shard, n_shards, *consumed, read_stats)

        while True:
            rows: list[list[int]] = []
            row_labels: list[list[int]] = []
            while len(rows) < B:
                while avail < L:
                    chunk = next(chunks, None)
                    if chunk is None:
                        break
                    segs.extend(chunk)
                    avail += sum(len(s.tokens) for s in chunk)
                if avail < L:
                    break  # end of a non-looping stream: the partial block is dropped
                block: list[int] = []
                block_labels: list[int] = []
                while len(block) < L:
                    seg = segs[0]
                    take = min(L - len(block), len(seg.tokens) - offset)
                    block.extend(seg.tokens[offset : offset + take])
                    block_labels.extend(seg.labels[offset : offset + take])
                    offset += take
                    if offset == len(seg.tokens):
                        segs.popleft()
                        offset = 0
                        consumed = seg.after
                avail -= L
                rows.append(block)
                row_labels.append(block_labels)
            if self.stats is not None:
                _merge_max(self.stats, read_stats.as_dict())
            if not rows:
                return
            if not segs:
                state = {"epoch": consumed[0], "doc_index": consumed[1], "buffer": []}
            elif offset == 0 and segs[0].index is not None:
                state = {"epoch": segs[0].epoch, "doc_index": segs[0].index, "buffer": []}
            else:
                head = segs[0]
                state = {"epoch": head.after[0], "doc_index": head.after[1], "buffer": head.tokens[offset:]}
                if head.labels != head.tokens:  # a task record cut at a block boundary
                    state["labels"] = head.labels[offset:]
            ids = torch.tensor(rows, dtype=torch.long)  # [B, L]
            labels = torch.tensor(row_labels, dtype=torch.long)  # [B, L]
            batch = {"input_ids": ids, "labels": labels, "worker": worker, "state": state}
            if self.stats is not None:
                batch["stats"] = read_stats.as_dict()
            yield batch
            if len(rows) < B:
                return


class StreamLoader:
    """DataLoader(batch_size=None) over a `PackedStream` that knows the position of every worker.

    Positions come from the batches actually delivered, so batches prefetched but not yet delivered at
    `state_dict()` time are produced again after a resume. Each `__iter__` continues from the current
    positions (a fresh loader starts at the beginning unless `load_state_dict` was called).
    Batch order is exact across resume for looping streams; for a non-looping stream whose workers run
    out at different times the tail order may differ (the batches are the same).
    """

    def __init__(self, dataset: PackedStream, pin_memory: bool = False) -> None:
        self.dataset = dataset
        self.pin_memory = pin_memory
        self._workers: dict[str, dict[str, Any]] = {}
        self._next_worker = 0

    def state_dict(self) -> dict[str, Any]:
        ds = self.dataset
        return {
            "world_size": ds.world_size,
            "rank": ds.rank,
            "num_workers": ds.num_workers,
            "next_worker": self._next_worker,
            "workers": copy.deepcopy(self._workers),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Set the position before iterating; a state from another world_size / num_workers / rank is a DataError."""
        self.dataset.load_state_dict(state)
        self._workers = copy.deepcopy({str(k): v for k, v in state.get("workers", {}).items()})
        self._next_worker = self.dataset._next_worker

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        ds = self.dataset
        ds.load_state_dict(self.state_dict())
        # Its own generator: the iterator's base-seed draw must not consume the global torch RNG (a resumed
        # run creates one more iterator than the uninterrupted one; the training's sampling uses that RNG).
        loader = DataLoader(
            ds,
            batch_size=None,
            num_workers=ds.num_workers,
            pin_memory=self.pin_memory,
            generator=torch.Generator(),
        )
        for batch in loader:
            worker = batch["worker"]
            self._workers[str(worker)] = batch["state"]
            self._next_worker = (worker + 1) % ds.shards_per_rank
            if ds.stats is not None:
                _merge_max(ds.stats, batch["stats"])
            yield {"input_ids": batch["input_ids"], "labels": batch["labels"]}


def eval_batches(
    files: Corpus | Sequence[Path],
    tokenizer_dir: str | Path,
    seq_len: int,
    micro_batch_size: int,
    max_batches: int,
    rank: int,
    world_size: int,
) -> list[dict[str, torch.Tensor]]:
    """The first `max_batches` batches of this rank's shard, no looping (for eval loss).

    `files`: the held-out text as a `Corpus` (rundir.eval_files: the eval share of data.paths, or
    data.eval_paths, or the bios held-out biographies). An empty result means no held-out text here.
    Ranks may get different counts (and the last batch fewer rows) when the corpus is small; callers
    that all-reduce must agree on a count first.
    """
    ds = PackedStream(files, tokenizer_dir, seq_len, micro_batch_size, rank, world_size, 0, loop=False)
    out: list[dict[str, torch.Tensor]] = []
    if max_batches <= 0:
        return out
    for batch in ds:
        out.append({"input_ids": batch["input_ids"], "labels": batch["labels"]})
        if len(out) == max_batches:
            break
    return out
