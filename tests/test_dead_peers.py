"""A rank that stops answering never leaves the others hanging: with launch.timeout_s the survivors' next
collective fails after it and the job exits non-zero naming the lost rank. (A killed node of the
two-namespace job, and the rerun resuming from the last complete checkpoint: tests/test_multinode.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from stablekd.launcher.driver.supervise import FAILED_RANK_GRACE_S
from stablekd.launcher.rank_status import status_path
from tests.conftest import QUICKSTART, REPO, TINY, stablekd_cmd

pytestmark = pytest.mark.distributed
TIMEOUT_S = 15
STEPS = 12


def test_a_hung_rank_fails_the_job_within_the_timeout_naming_it(tmp_path):
    run = tmp_path / "run"
    args = ["stage", "teacher", str(QUICKSTART), *TINY, f"run.out_dir={run}", "launch.nproc_per_node=2",
            f"launch.timeout_s={TIMEOUT_S}", f"teacher.max_steps={STEPS}", "teacher.save_every=2"]  # fmt: skip
    proc = subprocess.Popen(
        stablekd_cmd(*args), cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    marker = run / "teacher" / "ckpt" / "complete.json"
    deadline = time.time() + 300
    while not (marker.exists() and json.loads(marker.read_text())["step"] >= 2):
        assert proc.poll() is None and time.time() < deadline, "no checkpoint at step 2"
        time.sleep(0.05)
    rank1 = json.loads(status_path(run, "teacher", 1).read_text())
    os.kill(rank1["pid"], signal.SIGSTOP)  # alive but silent: a hung process, or a node cut off
    stopped = time.time()
    try:
        out = proc.communicate(timeout=TIMEOUT_S + 60)[0]
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    took = time.time() - stopped
    rank0 = json.loads(status_path(run, "teacher", 0).read_text())
    assert rank0["state"].startswith("failed: RuntimeError") and rank0["at"] - stopped < TIMEOUT_S + 10
    print(f"gave up {took:.1f}s after rank 1 stopped")
    assert proc.returncode != 0
    # The survivor fails after launch.timeout_s and records it; the job is then stopped within
    # FAILED_RANK_GRACE_S (DeepSpeed's launcher alone would give the silent rank 30 s more: supervise.py).
    assert took < TIMEOUT_S + FAILED_RANK_GRACE_S + 15, f"the job took {took:.0f}s to give up on rank 1"
    assert f"lost rank 1 (pid {rank1['pid']}" in out, out[-2000:]
    assert not (run / "teacher" / "DONE.json").exists()
    # The rerun after a lost peer resumes from the last complete checkpoint: tests/test_multinode.py.
