"""Endless training epochs over shard loaders, with the same number of steps on every rank.

Shards are written per rank and read round-robin (shards/manifest.py), so consumer ranks hold unequal numbers of
records: a rank that runs out first would wait in the next collective while the others still train (a
hang, or a NCCL timeout). `EqualEpochs` ends an epoch for every rank at once: before each batch the
ranks agree (one MIN all-reduce of one int) that every rank has one; the first time some rank has none,
all of them drop what they drew, reset their loader and start the next epoch. What a rank drops is at
most its last batch of the epoch, and which records an epoch covers is the same in every epoch.

The all-reduce runs inside `next()`, which the training loop calls the same number of times on every
rank, before any forward: it can never interleave with a model's collectives. In follow mode (shards
read while the writer runs) an epoch lasts until the writer's final manifest is read.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch
import torch.distributed as dist


class Resettable(Protocol):
    def __iter__(self) -> Iterator[dict]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def reset(self) -> None: ...


def _all_have(has: bool) -> bool:
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return has
    flag = torch.tensor([int(has)], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class EqualEpochs:
    """Batches of `loader` forever, epoch after epoch, every epoch the same length on every rank.

    Args:
        loader: a resettable, resumable loader (ShardLoader).
        what: named in the error when an epoch has no batch (e.g. the shard directory).

    State: {"epoch", "loader"}; a resumed run continues inside the same epoch at the same position.
    """

    def __init__(self, loader: Resettable, what: str) -> None:
        self.loader, self.what = loader, what
        self.epoch, self.drawn = 0, 0  # drawn: batches of this epoch so far (equal on every rank)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            it = iter(self.loader)
            while _all_have((batch := next(it, None)) is not None):
                self.drawn += 1
                yield batch
            if self.drawn == 0:
                raise ValueError(
                    f"{self.what}: an epoch gives some rank no batch (fewer records than ranks × workers × "
                    "micro batch): label more sequences or use fewer ranks"
                )
            self.epoch, self.drawn = self.epoch + 1, 0
            self.loader.reset()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "drawn": self.drawn, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "loader" not in state:
            raise ValueError(
                f"{self.what}: the saved data state {sorted(state)} is not an epoch reader's; resume with "
                "the same source (offline shards or online teacher) the run started with"
            )
        self.epoch, self.drawn = int(state["epoch"]), int(state["drawn"])
        self.loader.load_state_dict(state["loader"])
