"""Online soft labels: the top-k of a teacher running inside the consuming job, batch by batch.

For data too big to store as shards (DESIGN §1, "online: in the same job"). `OnlineSoftLabels` has the
interface of `ShardLoader(soft_label_reader(...))`: iterate it for batches

    input_ids      int32   [B, L]
    topk_ids       int32   [B, L, k]
    topk_logprobs  float16 [B, L, k]   log_softmax(teacher_logits / T), top k, sorted descending
    loss_mask      int32   [B, L]      1 = learned, 0 = context (task prompts)

with the very values the offline writer would have stored for the same sequences (the same `compress`
and the same float16 cast), and save/restore its position with `state_dict` / `load_state_dict`.

ZeRO-3 gathers each layer's parameters collectively, so every rank must run the same number of teacher
forwards. `lockstep` keeps them together: once a rank's stream is exhausted it runs an idle forward for
each round the others still have, and all stop together. A looping training stream never runs out, so
the extra all-reduce per batch is all it costs there.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from stablekd.data_pipeline.soft_labels import compress
from stablekd.objectives.lm import IGNORE_INDEX

T = TypeVar("T")
_FP16_MIN = float(np.finfo(np.float16).min)  # the writer's clip: -inf log-probs become -65504


class Teacher(Protocol):
    """What the online source needs of a (possibly ZeRO-3 partitioned) teacher."""

    vocab_size: int

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor: ...  # [B, L] -> [B, L, V]

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


def storage_cast(
    input_ids: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """What a soft-label shard stores and a ShardLoader returns: int32 ids, float16 log-probs in [-65504, 0],
    int32 loss_mask (1 where `labels` is not -100)."""
    return {
        "input_ids": input_ids.to(torch.int32),
        # uint16 on disk, widened to int32 by the reader: int32 either way for the consumer
        "topk_ids": topk_ids.to(torch.int32),
        "topk_logprobs": topk_logprobs.float().clamp(_FP16_MIN, 0.0).to(torch.float16),
        "loss_mask": (labels != IGNORE_INDEX).to(torch.int32),
    }


class OnlineSoftLabels:
    """Soft labels for a token stream, computed by `teacher` as batches are drawn.

    Args:
        batches: a resumable stream of {"input_ids": [B, L], "labels": [B, L]} batches (a StreamLoader over the training
            PackedStream, as the offline stage reads); its state is this source's state.
        teacher: `logits(input_ids)` and `idle_forward()` (model.sharded_teacher.ShardedTeacher).
        k, temperature: as in the manifest meta of offline shards.
        in_step: run `lockstep` so every rank runs the same number of teacher forwards (ZeRO-3 needs it);
            False only when the caller already guarantees equal counts (or the teacher is not partitioned).
    """

    def __init__(
        self, batches: Any, teacher: Teacher, k: int, temperature: float, in_step: bool = True
    ) -> None:
        if not 1 <= k <= teacher.vocab_size:
            raise ValueError(f"k must be in [1, vocab_size={teacher.vocab_size}], got {k}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.batches, self.teacher = batches, teacher
        self.k, self.temperature, self.in_step = k, temperature, in_step

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rounds = lockstep(self.batches) if self.in_step else iter(self.batches)
        for batch in rounds:
            if batch is None:
                self.teacher.idle_forward()
                continue
            ids = batch["input_ids"]  # [B, L]
            with torch.no_grad():
                logits = self.teacher.logits(ids)  # [B, L, V]
                topk_ids, topk_logprobs = compress(logits, self.k, self.temperature)  # [B, L, k] each
            yield storage_cast(ids, topk_ids.cpu(), topk_logprobs.cpu(), batch["labels"])

    def state_dict(self) -> dict:
        return {"online": True, "stream": self.batches.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if not state.get("online"):
            raise ValueError(
                "this data state was saved by the offline soft-label reader; resume with the same "
                "source (online or offline) the run started with"
            )
        self.batches.load_state_dict(state["stream"])
