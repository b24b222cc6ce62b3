"""What each rank runs for tests/test_soft_labels_stage.py (started by DeepSpeed's per-node launcher, 2 ranks):

    python -u -m deepspeed.launcher.launch --world_info=<{"localhost": [0, 1]}> --master_addr=127.0.0.1 \
        --master_port=P --no_local_rank tests/soft_labels_worker.py <run_dir> <result.json>

1. the `soft_labels` stage itself (`stages.soft_labels.run`, what `stablekd stage soft_labels` runs per rank);
2. with the sharded teacher the stage returns, the online source's first batch on each rank next to the
   first batch the offline reader gives the same consumer rank (one launch for both: launches are slow).
Rank 0 writes the comparison of every rank to <result.json>.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from stablekd.launcher.config import load_config
from stablekd.launcher.rank import artifacts
from stablekd.launcher.rank.worker import leave
from stablekd.launcher.stages import soft_labels


def main(run_dir: str, result: str) -> None:
    cfg = load_config(Path(run_dir) / "config.yaml")
    teacher = soft_labels.run(cfg)
    rank, world, micro = dist.get_rank(), dist.get_world_size(), cfg.soft_labels.micro_batch_size
    online = artifacts.open_soft_labels(cfg, rank, world, micro, teacher=teacher)
    offline = artifacts.open_soft_labels(cfg, rank, world, micro)
    # One batch each: every rank has one, so both run exactly one teacher forward (ZeRO-3 stays in step).
    on, off = next(iter(online)), next(iter(offline))
    mine = {
        "rank": rank,
        "keys": [sorted(on), sorted(off)],
        "dtypes": [{k: str(v.dtype) for k, v in b.items()} for b in (on, off)],
        "shapes": [{k: list(v.shape) for k, v in b.items()} for b in (on, off)],
        "input_ids_equal": torch.equal(on["input_ids"], off["input_ids"]),
        "topk_ids_equal": torch.equal(on["topk_ids"], off["topk_ids"]),
        "logprobs_max_abs_diff": float(
            (on["topk_logprobs"].float() - off["topk_logprobs"].float()).abs().max()
        ),
        "online_state": online.state_dict(),
    }
    parts: list[dict] = [{} for _ in range(world)]
    dist.all_gather_object(parts, mine)
    if rank == 0:
        Path(result).write_text(json.dumps(parts, indent=1))
    dist.barrier()
    leave(0)  # as stablekd's own worker ends (launcher/rank/worker.py)


if __name__ == "__main__":
    main(*sys.argv[1:])
