"""The writer process of tests/test_follow.py: the soft_labels stage's writing, slowed down, on its own.

    python tests/follow_writer.py <out_dir> <meta.json> <shards> <marker>

One rank (world size 1) writes <shards> shards of RECORDS_PER_SHARD records through the real
`SoftLabelWriter`, one record every INTERVAL_S / RECORDS_PER_SHARD seconds, so one shard is committed
every INTERVAL_S and between two commits it holds uncommitted records (what a kill loses). After the last
shard it touches <marker>, then closes and finalizes. Record i has input_ids[0] = i.
Imports only the shard format and torch (a process importing the launcher would take seconds longer to
start).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

# torch as a soft_labels rank has it loaded: else the writer imports it at its first batch, ~1.6 s after its
# rank manifest, past the follow test's 2 s timeout on loaded cores
import numpy as np
import torch  # noqa: F401

from stablekd.data_pipeline.soft_labels import SoftLabelWriter, finalize_soft_labels

RECORDS_PER_SHARD = 2
INTERVAL_S = 0.3


def record(i: int, meta: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Record i as (input_ids [1, L], topk_ids [1, L, k], topk_logprobs [1, L, k])."""
    L, k, V = meta["seq_len"], meta["k"], meta["vocab_size"]
    input_ids = (i + np.arange(L)).reshape(1, L) % V
    topk_ids = (i + np.arange(L * k)).reshape(1, L, k) % V
    return input_ids, topk_ids, np.full((1, L, k), -1.5, np.float32)


def main(out_dir: str, meta_json: str, shards: int, marker: str) -> None:
    meta = json.loads(Path(meta_json).read_text())
    writer = SoftLabelWriter(out_dir, 0, meta, records_per_shard=RECORDS_PER_SHARD, world_size=1)
    for i in range(shards * RECORDS_PER_SHARD):
        time.sleep(INTERVAL_S / RECORDS_PER_SHARD)
        writer.add_batch(*record(i, meta))
    Path(marker).touch()
    writer.close()
    finalize_soft_labels(out_dir, 1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
