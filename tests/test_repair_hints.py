"""Every refusal about a run directory's artifacts ends with the command that redoes or resumes it
(launcher/hints.py): a corrupted shard, a DONE.json or data_order.json of another config, a missing or
incomplete teacher checkpoint, an unfinished upstream stage."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from stablekd.data_pipeline.shards.format import ShardError
from stablekd.data_pipeline.shards.manifest import finalize
from stablekd.data_pipeline.shards.reader import ShardReader
from stablekd.data_pipeline.shards.writer import ShardWriter
from stablekd.launcher import done, hints, rundir
from stablekd.launcher.config import ConfigError, load_config
from stablekd.launcher.driver import data_order, preflight
from stablekd.launcher.rank_status import status_path
from tests.conftest import QUICKSTART


def _cfg(run, *extra):
    return load_config(QUICKSTART, [f"run.out_dir={run}", *extra])


def _redo(cfg, stage: str) -> str:
    return f"to redo it: delete {cfg.run_dir / stage} and run `stablekd stage {stage} {cfg.run_dir / 'config.yaml'}`"


@pytest.mark.parametrize("where", ["", "candidates"])
def test_corrupted_shard_names_the_stage_that_rewrites_it(tmp_path, where):
    cfg = _cfg(tmp_path / "run")
    out = rundir.stage_dir(cfg, "soft_labels") / where
    with ShardWriter(out, 0, "toy", {"v": 1}, records_per_shard=2) as w:
        w.add(x=np.arange(4, dtype=np.int64))
    finalize(out, 1)
    shard = sorted(out.glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last array byte: same size, other sha256
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError) as e:
        list(ShardReader(out, "toy"))
    assert "sha256" in str(e.value) and "(corrupted)" in str(e.value)
    # what a rank records (worker.py) and the launcher prints after "rank 0 (...) failed: ShardError: "
    assert hints.repair(cfg, e.value, limit=400) == f"{str(e.value)[:400]}; {_redo(cfg, 'soft_labels')}"
    # an error that is no artifact of this run gets no command
    assert hints.repair(cfg, ValueError(f"{shard} looks odd")) == f"{shard} looks odd"


def test_done_of_another_config_says_how_to_redo(tmp_path):
    cfg = _cfg(tmp_path / "run")
    done.write_done(cfg, "teacher", {}, {})
    path = rundir.done_path(cfg, "teacher")
    path.write_text(json.dumps({**json.loads(path.read_text()), "config_hash": "0123456789abcdef"}))
    with pytest.raises(ConfigError) as e:
        done.is_done(cfg, "teacher")
    assert str(e.value).startswith(
        f"{path}: stage teacher finished with another config (hash 0123456789abcdef"
    )
    assert str(e.value).endswith(
        f"use a new run.out_dir, or to redo it: delete {cfg.run_dir / 'teacher'} and rerun the same command"
    )
    with pytest.raises(ConfigError) as e:  # a later stage that reads it
        done.check_upstream(cfg, "soft_labels")
    assert str(e.value).endswith(f"use the config it finished with, or {_redo(cfg, 'teacher')}")


def test_resume_on_other_data_says_how_to_start_over(tmp_path):
    (tmp_path / "corpus.txt").write_text("one line of text\n")
    cfg = _cfg(tmp_path / "run", f"data.paths=[{tmp_path / 'corpus.txt'}]")
    data_order.record(cfg, "teacher")
    (rundir.ckpt_dir(cfg, "teacher")).mkdir(parents=True)
    (rundir.ckpt_dir(cfg, "teacher") / "complete.json").write_text(
        json.dumps({"tag": "step0000002", "step": 2})
    )
    with pytest.raises(ConfigError) as e:
        data_order.check(
            _cfg(tmp_path / "run", f"data.paths=[{tmp_path / 'corpus.txt'}]", "run.seed=7"), "teacher"
        )
    assert "run.seed: 0 then, 7 now" in str(e.value)
    assert str(e.value).endswith(
        f"restore them, use a new run.out_dir, or to redo it: delete {cfg.run_dir / 'teacher'} and rerun the "
        "same command"
    )


def test_missing_and_incomplete_teacher_checkpoint(tmp_path):
    cfg = _cfg(tmp_path / "run")
    ckpt = rundir.ckpt_dir(cfg, "teacher")
    with pytest.raises(ConfigError) as e:
        preflight.teacher_checkpoint(cfg, "soft_labels")
    assert str(e.value) == (
        f"{ckpt}/complete.json: missing: no complete teacher checkpoint; run `stablekd stage teacher "
        f"{cfg.run_dir / 'config.yaml'}` to finish it"
    )
    ckpt.mkdir(parents=True)  # complete.json names a tag that is gone: resuming cannot help
    (ckpt / "complete.json").write_text(json.dumps({"tag": "step0000004", "step": 4, "world_size": 1}))
    with pytest.raises(ConfigError) as e:
        preflight.teacher_checkpoint(cfg, "soft_labels")
    assert (
        str(e.value) == f"{ckpt / 'step0000004'}: named in complete.json but missing; {_redo(cfg, 'teacher')}"
    )


def test_a_rank_stopped_after_recording_its_failure_keeps_it(tmp_path):
    # supervise.py stops a job as soon as one rank records a failure, often while that rank still prints
    # its traceback: the failure (and its repair command) must survive the SIGTERM.
    child = (
        "import os, signal, sys; from stablekd.launcher.rank_status import RankStatus\n"
        "s = RankStatus(sys.argv[1], 'distill', 0); s.end('failed: ShardError: x; to redo it: ...')\n"
        "os.kill(os.getpid(), signal.SIGTERM)"
    )
    proc = subprocess.run([sys.executable, "-c", child, str(tmp_path)], capture_output=True)
    assert proc.returncode == 128 + signal.SIGTERM
    assert (
        json.loads(status_path(tmp_path, "distill", 0).read_text())["state"]
        == "failed: ShardError: x; to redo it: ..."
    )
