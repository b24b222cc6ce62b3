"""Online soft labels: the encoded distribution of a teacher running inside the consuming job, batch by batch.

For data too big to store as shards (`distill.online`). `OnlineSoftLabels` has the
interface of `Decoded(ShardLoader(soft_label_reader(...)), meta)`: iterate it for decoded batches
(encodings.decode: input_ids, loss_mask, and topk_ids / topk_logprobs or sample_ids / sample_weights)

decoded from the very arrays the offline writer would have stored for the same sequences (the same
`encodings.encode_head`, the same casts), and save/restore its position with `state_dict` / `load_state_dict`.
The teacher never makes a batch's whole [B, L, V] logits: its head makes them from the last hidden state
one chunk of rows at a time, each encoded and dropped (data_pipeline/encodings.py, `encode_head`).

ZeRO-3 gathers each layer's parameters collectively, so every rank must run the same number of teacher
forwards. `lockstep` keeps them together: once a rank's stream is exhausted it runs an idle forward for
each round the others still have, and all stop together. A looping training stream never runs out, so
the extra all-reduce per batch is all it costs there.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
import torch.distributed as dist

from stablekd.data_pipeline import encodings
from stablekd.data_pipeline.shards.reader import widen
from stablekd.objectives.lm import IGNORE_INDEX, HeadLoss

if TYPE_CHECKING:  # a type only: model imports data_pipeline
    from stablekd.model.head import HeadRows

T = TypeVar("T")


class Teacher(Protocol):
    """What the online source and the soft-label writer need of a (possibly ZeRO-3 partitioned) teacher
    (model.sharded_teacher.ShardedTeacher)."""

    vocab_size: int

    # [B, L] -> Σ of head_loss.fn over the chunks of logits the head makes from the last hidden state
    # (``model(input_ids=..., head_loss=...)[0]``, model/head.py): what the soft labels are encoded from
    def head(self, input_ids: torch.Tensor, head_loss: HeadLoss) -> torch.Tensor: ...

    # on-policy scoring (data_pipeline/on_policy.py): [B, L] -> [B, L, H] the head's input, and the head as a
    # function of hidden rows (model/head.py `last_hidden`, `HeadRows`)
    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def head_rows(self) -> HeadRows: ...

    def idle_forward(self) -> None: ...  # one forward whose output is discarded (keeps ZeRO-3 in step)


def lockstep(items: Iterable[T]) -> Iterator[T | None]:
    """Yield this rank's items, then None while any other rank still has items; all ranks stop together.

    One MAX all-reduce per round (skipped without a process group or with one rank). The caller runs an
    idle forward for each None, so every rank runs exactly max over ranks of len(items) forwards.
    """
    synced = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    it = iter(items)
    exhausted = False
    while True:
        item = None if exhausted else next(it, None)
        exhausted = exhausted or item is None
        if synced:
            more = torch.tensor([0 if exhausted else 1], dtype=torch.int32)
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
            if not more.item():
                return
        elif exhausted:
            return
        yield item


class OnlineSoftLabels:
    """Soft labels for a token stream, computed by `teacher` as batches are drawn.

    Args:
        batches: a resumable stream of {"input_ids": [B, L], "labels": [B, L]} batches (a StreamLoader
            over the training PackedStream, as the offline stage reads); its state is this source's state.
        teacher: `head(input_ids, head_loss)` and `idle_forward()` (model.sharded_teacher.ShardedTeacher).
        meta: a soft-label meta (`soft_label_meta`: encoding, its parameters, T, vocabulary): each batch is
            encoded and decoded exactly as a shard would store and a reader would return it.
        in_step: run `lockstep` so every rank runs the same number of teacher forwards (ZeRO-3 needs it);
            False only when the caller already guarantees equal counts (or the teacher is not partitioned).
    The `sampled` encoding draws with a seed taken from the global torch RNG, which the training loop
    saves and restores, so a resumed run draws what an uninterrupted one would.
    """

    def __init__(self, batches: Any, teacher: Teacher, meta: dict, in_step: bool = True) -> None:
        encodings.check(meta["encoding"], meta, teacher.vocab_size)
        if not meta["temperature"] > 0:
            raise ValueError(f"temperature must be > 0, got {meta['temperature']}")
        self.batches, self.teacher, self.meta, self.in_step = batches, teacher, meta, in_step

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rounds = lockstep(self.batches) if self.in_step else iter(self.batches)
        for batch in rounds:
            if batch is None:
                self.teacher.idle_forward()
                continue
            ids = batch["input_ids"]  # [B, L]
            seed = int(torch.randint(0, 2**62, ()))
            with torch.no_grad():  # the teacher's head encodes chunk by chunk: no [B, L, V] logits
                stored = encodings.encode_head(partial(self.teacher.head, ids), ids.shape, self.meta, seed)
            stored = {k: torch.from_numpy(widen(v)) for k, v in stored.items()}
            stored["input_ids"] = ids.to(torch.int32)
            stored["loss_mask"] = (batch["labels"] != IGNORE_INDEX).to(torch.int32)
            yield encodings.decode(stored, self.meta)

    def state_dict(self) -> dict:
        return {"online": True, "stream": self.batches.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if not state.get("online"):
            raise ValueError(
                "this data state was saved by the offline soft-label reader; resume with the same "
                "source (online or offline) the run started with"
            )
        self.batches.load_state_dict(state["stream"])
