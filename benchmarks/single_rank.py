"""The one-process bootstrap every in-process benchmark shares: a torch.distributed group of world size 1
(what engine.train's collectives and DeepSpeed's engine need), on a port of the benchmark's own so two
benchmarks can run side by side."""

from __future__ import annotations

import os

from stablekd.launcher.rank import engine


def start(port: int, threads: int = 0) -> None:
    """Rank 0 of 1 on 127.0.0.1:`port` (MASTER_PORT in the environment wins); `threads` as
    launch.threads_per_rank (0 = all cores)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=os.environ.get("MASTER_PORT", str(port)),
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
    )
    engine.setup_distributed(threads)
