"""Streaming for real: a consumer follows soft-label shards that another *process* is still writing.

The reader is the one a distill rank gets (`artifacts.open_soft_labels` with `distill.follow=true`); the
writer is a separate Python process (tests/follow_writer.py: nothing shared but the directory) that
commits one shard at a time through the real `SoftLabelWriter`, as the soft_labels stage does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stablekd.data_pipeline.shards.format import ShardError, rank_manifest_name, shard_name
from stablekd.data_pipeline.soft_labels import soft_label_meta
from stablekd.data_pipeline.tokenizer import tokenizer_hash
from stablekd.launcher import models, rundir
from stablekd.launcher.config import ExperimentConfig, load_config
from stablekd.launcher.rank import artifacts
from tests.conftest import QUICKSTART
from tests.follow_writer import RECORDS_PER_SHARD

WRITER = Path(__file__).with_name("follow_writer.py")
L, K, V = 8, 4, 400
MICRO = RECORDS_PER_SHARD  # one shard per batch: a batch never waits on two commits
SHARDS = 8  # 2.4 s of writing: the reader (polling once a second) sees shard 0 long before the end
LAST_SHARD = "writer-committed-its-last-shard"  # the marker the writer touches before it finalizes


def _config(run_dir: Path, timeout_s: float) -> ExperimentConfig:
    return load_config(
        QUICKSTART,
        [
            f"run.out_dir={run_dir}",
            f"data.seq_len={L}",
            f"soft_labels.k={K}",
            "distill.follow=true",
            f"distill.follow_timeout_s={timeout_s}",
        ],
    )


def _start_writer(cfg: ExperimentConfig, shards: int, marker: Path) -> subprocess.Popen:
    # Only the tokenizer's bytes enter the manifest check (its hash): no need to train one.
    tok = models.tokenizer_dir(cfg)
    tok.mkdir(parents=True)
    (tok / "tokenizer.model").write_bytes(b"stands in for a SentencePiece model")
    sl = cfg.soft_labels  # the quickstart's encoding: top-k with one-byte log-probs
    meta = soft_label_meta(
        "teacher/step-1", tokenizer_hash(tok), V, sl.temperature, cfg.data.seq_len, sl.encoding, k=K,
        logprob_bits=sl.logprob_bits,
    )  # fmt: skip
    meta_json = cfg.run_dir / "meta.json"
    meta_json.write_text(json.dumps(meta))
    out = rundir.stage_dir(cfg, "soft_labels")
    return subprocess.Popen([sys.executable, str(WRITER), str(out), str(meta_json), str(shards), str(marker)])


def _wait_for(path: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def _ids(batch: dict) -> list[int]:
    return [int(x) for x in batch["input_ids"][:, 0]]


def test_reader_follows_a_running_writer_process(tmp_path: Path) -> None:
    # The timeout only bounds a hang here: it must cover the writer process's start (imports torch).
    cfg = _config(tmp_path / "run", timeout_s=60)
    marker = tmp_path / LAST_SHARD
    proc = _start_writer(cfg, SHARDS, marker)
    try:
        source = artifacts.open_soft_labels(cfg, rank=0, world_size=1, micro_batch_size=MICRO)
        batches = iter(source)
        got = _ids(next(batches))
        # Overlap: the first batch came while the writer still had shards to write.
        assert not marker.exists()
        while len(got) < SHARDS * RECORDS_PER_SHARD:
            got += _ids(next(batches))
        assert got == list(range(SHARDS * RECORDS_PER_SHARD))  # every record, once, in the order written
        # The epoch ends only once the writer's final manifest is read; the next one starts over.
        again = next(batches)
        assert source.batches.epoch == 1 and _ids(again) == got[:MICRO]
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()


def test_reader_fails_within_its_timeout_when_the_writer_is_killed(tmp_path: Path) -> None:
    timeout_s = 2.0
    cfg = _config(tmp_path / "run", timeout_s=timeout_s)
    out = rundir.stage_dir(cfg, "soft_labels")
    manifest = out / rank_manifest_name(0)
    proc = _start_writer(cfg, 1000, tmp_path / LAST_SHARD)  # would write for minutes
    killed_at: list[float] = []

    def kill_after_two_shards() -> None:
        deadline = time.monotonic() + 60
        while len(json.loads(manifest.read_text())["shards"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.kill()  # SIGKILL: no close(), no finalize; its buffered records are lost
        proc.wait()
        killed_at.append(time.monotonic())

    try:
        # The writer's first act is its rank manifest: the reader's timeout counts from there, as for a
        # distill rank started beside a running soft_labels stage (a fresh interpreter importing torch
        # takes longer than 2 s to get there).
        _wait_for(manifest)
        source = artifacts.open_soft_labels(cfg, rank=0, world_size=1, micro_batch_size=MICRO)
        killer = threading.Thread(target=kill_after_two_shards)
        killer.start()
        got: list[int] = []
        with pytest.raises(ShardError) as err:
            for batch in source:
                got += _ids(batch)
        failed_at = time.monotonic()
        killer.join()
    finally:
        proc.kill()
    assert proc.returncode == -9
    committed = len(json.loads(manifest.read_text())["shards"])
    assert committed >= 2
    assert got == list(range(committed * RECORDS_PER_SHARD))  # everything committed was read, in order
    # It names the shard it waited for: the one the killed writer never committed.
    assert f"waiting for {shard_name(0, committed)}" in str(err.value)
    assert f"nothing new committed for {timeout_s:g}s" in str(err.value)
    # The timeout counts from the last commit (before the kill); the reader polls once a second.
    assert failed_at - killed_at[0] < timeout_s + 1.0 + 2.0
