"""One run per run directory (launcher/driver/runlock.py): a second launch is refused naming the holder; the lock
dies with its holder and never with a child it started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from stablekd.launcher.config import ConfigError
from stablekd.launcher.driver import runlock
from tests.conftest import opened_by

# A launcher stand-in: takes the lock, starts a long child the way supervise.py starts the runner, says so.
HOLDER = """
import subprocess, sys, time
from stablekd.launcher.driver import runlock
with runlock.hold(sys.argv[1]):
    child = subprocess.Popen(["sleep", "60"])
    print(child.pid, flush=True)
    time.sleep(60)
"""


def test_lock_names_its_holder_and_dies_with_it_not_with_its_child(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(ConfigError) as e, runlock.hold(run):
            pass
        assert str(e.value).startswith(
            f"{run} is in use: stablekd pid {holder.pid} on host {socket.gethostname()} (since "
        )
        assert opened_by(holder.pid, runlock.lock_path(run))
        assert not opened_by(child, runlock.lock_path(run))  # close-on-exec: the child has no share in it

        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert psutil.pid_exists(child)  # orphaned, still running: it must not keep the directory locked
        with runlock.hold(run):
            assert runlock.holder(run)["pid"] == os.getpid()
        with runlock.hold(run):  # released on leaving the block
            pass
    finally:
        holder.kill()
        os.kill(child, signal.SIGKILL)


@pytest.mark.distributed
def test_second_launch_on_a_running_directory_is_refused_at_once(hung_job):
    """The conftest `hung_job`: while it holds its directory, the same command again and `stablekd status`."""
    job, run = hung_job, hung_job.run
    assert job.alive, "the first run must still hold the directory during the checks"
    assert job.second.returncode == 2
    assert job.second.stderr.splitlines() == [
        f"stablekd: error: {run} is in use: stablekd pid {job.pid} on host {socket.gethostname()} "
        f"(since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(job.holder['since']))}) holds "
        f"{run / 'stablekd.lock'}; wait for that run to end or stop it, or use another run.out_dir"
    ]
    assert job.refused_in < 15  # at once: no waiting on the first run (the time is Python and torch imports)
    assert job.status.returncode == 0 and "teacher" in job.status.stdout
    assert job.ranks and job.lock_holders == []  # the runner and the ranks never held the lock
    # The refused launch wrote nothing: the driver's log has the first run's header only, its config is
    # the first run's bytes.
    assert (run / "logs" / "pipeline.log").read_text().count("=== ") == 1 and job.config_kept
