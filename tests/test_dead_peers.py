"""A rank that stops answering never leaves the others hanging: with launch.timeout_s the survivors' next
collective fails after it and the job exits non-zero naming the lost rank. (A killed node of the
two-namespace job, and the rerun resuming from the last complete checkpoint: tests/test_multinode.py.)
The job is the conftest `hung_job`, shared with tests/test_runlock.py."""

from __future__ import annotations

import json

import pytest

from stablekd.launcher.driver.supervise import FAILED_RANK_GRACE_S
from stablekd.launcher.rank_status import status_path
from tests.conftest import HUNG_TIMEOUT_S

pytestmark = pytest.mark.distributed


def test_a_hung_rank_fails_the_job_within_the_timeout_naming_it(hung_job):
    job = hung_job
    rank0 = json.loads(status_path(job.run, "teacher", 0).read_text())
    assert (
        rank0["state"].startswith("failed: RuntimeError") and rank0["at"] - job.stopped < HUNG_TIMEOUT_S + 10
    )
    print(f"gave up {job.took:.1f}s after rank 1 stopped")
    assert job.returncode != 0
    # The survivor fails after launch.timeout_s and records it; the job is then stopped within
    # FAILED_RANK_GRACE_S (DeepSpeed's launcher alone would give the silent rank 30 s more: supervise.py).
    assert job.took < HUNG_TIMEOUT_S + FAILED_RANK_GRACE_S + 15, (
        f"the job took {job.took:.0f}s to give up on rank 1"
    )
    assert f"lost rank 1 (pid {job.rank1['pid']}" in job.out, job.out[-2000:]
    assert not (job.run / "teacher" / "DONE.json").exists()
    # The rerun after a lost peer resumes from the last complete checkpoint: tests/test_multinode.py.
