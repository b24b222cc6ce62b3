"""ShardLoader: batches of a ShardReader through a DataLoader, with the position a checkpoint keeps."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from stablekd.data_pipeline.shards.reader import ShardReader


def collate_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack one worker's records into a batch {name: [B, ...]}; "state" = the last record's state."""
    batch: dict[str, Any] = {k: torch.stack([rec[k] for rec in records]) for k in records[0] if k != "state"}
    batch["state"] = records[-1]["state"]
    return batch


class ShardLoader:
    """A DataLoader over a ShardReader that knows where each worker stream stands.

    Yields {name: tensor [micro_batch_size, ...]} batches; each batch comes from one worker (DataLoader
    batches an IterableDataset per worker), so its last record's state is that worker's position. Only
    *delivered* batches advance `state_dict()`: batches prefetched but not yet consumed are read again
    after a resume. The state is per consumer rank: save it per rank (rank is checked on load).

    Args:
        reader: the ShardReader; its num_workers sets the DataLoader's.
        micro_batch_size: records per batch.
        drop_last: drop each worker's final short batch.
        **dataloader_kwargs: passed to DataLoader (pin_memory, prefetch_factor, ...).
    """

    def __init__(
        self, reader: ShardReader, micro_batch_size: int, drop_last: bool = False, **dataloader_kwargs: Any
    ) -> None:
        self.reader = reader
        self.micro_batch_size = micro_batch_size
        self.drop_last = drop_last
        self.dataloader_kwargs = dataloader_kwargs
        self._positions = reader.state_dict()["positions"]
        self._next_worker = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.reader.load_state_dict(self.state_dict())
        loader = DataLoader(
            self.reader,
            batch_size=self.micro_batch_size,
            num_workers=self.reader.num_workers,
            collate_fn=collate_records,
            drop_last=self.drop_last,
            # Its own generator: a DataLoader iterator draws its base seed from the global torch RNG
            # otherwise, and the extra draw of a resumed run would change the training's random stream.
            generator=torch.Generator(),
            **self.dataloader_kwargs,
        )
        for batch in loader:
            st = batch.pop("state")
            self._positions[st["worker"]] = [st["shard"], st["record"]]
            self._next_worker = (st["worker"] + 1) % self.reader.workers
            yield batch

    def state_dict(self) -> dict:
        return {
            "world_size": self.reader.world_size,
            "num_workers": self.reader.num_workers,
            "rank": self.reader.rank,
            "positions": [list(p) for p in self._positions],
            "next_worker": self._next_worker,
        }

    def load_state_dict(self, state: dict) -> None:
        self.reader.load_state_dict(state)  # validates world_size / num_workers / rank / streams
        self._positions = self.reader.state_dict()["positions"]
        self._next_worker = self.reader._next_worker

    def reset(self) -> None:
        """Back to the start of the data (next epoch)."""
        self.reader.load_state_dict(None)
        self._positions = self.reader.state_dict()["positions"]
        self._next_worker = 0
