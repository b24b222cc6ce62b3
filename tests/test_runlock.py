"""One run per run directory (launcher/driver/runlock.py): a second launch is refused naming the holder; the lock
dies with its holder and never with a child it started."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from stablekd.launcher.config import ConfigError
from stablekd.launcher.driver import runlock
from tests.conftest import QUICKSTART, REPO, TINY, run_stablekd, stablekd_cmd

# A launcher stand-in: takes the lock, starts a long child the way supervise.py starts the runner, says so.
HOLDER = """
import subprocess, sys, time
from stablekd.launcher.driver import runlock
with runlock.hold(sys.argv[1]):
    child = subprocess.Popen(["sleep", "60"])
    print(child.pid, flush=True)
    time.sleep(60)
"""


def _opened_by(pid: int, path: Path) -> bool:
    fds = Path(f"/proc/{pid}/fd")
    return any(os.path.realpath(fd) == str(path.resolve()) for fd in fds.iterdir())


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
        assert _opened_by(holder.pid, runlock.lock_path(run))
        assert not _opened_by(child, runlock.lock_path(run))  # close-on-exec: the child has no share in it

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
def test_second_launch_on_a_running_directory_is_refused_at_once(tmp_path):
    run = tmp_path / "run"
    args = ["stage", "teacher", str(QUICKSTART), f"run.out_dir={run}", *TINY, "launch.nproc_per_node=2",
            "teacher.max_steps=8", "teacher.dtype=fp32"]  # fmt: skip
    first = subprocess.Popen(
        stablekd_cmd(*args), cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        status = run / "logs" / "ranks" / "teacher.r00000.json"
        deadline = time.time() + 240
        while not status.exists():  # the first run's ranks have started
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.2)
        t0 = time.monotonic()
        second = run_stablekd(*args, check=False)
        refused_in = time.monotonic() - t0
        third = run_stablekd("status", str(run), check=False)  # reads only: never takes the lock
        assert first.poll() is None, "the first run must still hold the directory during the checks"
        ranks = psutil.Process(first.pid).children(recursive=True)
        leaked = [p.pid for p in ranks if _opened_by(p.pid, runlock.lock_path(run))]
    finally:
        rc = first.wait(timeout=300)
    assert second.returncode == 2
    assert second.stderr.splitlines() == [
        f"stablekd: error: {run} is in use: stablekd pid {first.pid} on host {socket.gethostname()} "
        f"(since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(runlock.holder(run)['since']))}) holds "
        f"{run / 'stablekd.lock'}; wait for that run to end or stop it, or use another run.out_dir"
    ]
    assert refused_in < 15  # at once: no waiting on the first run (the time is Python and torch imports)
    assert third.returncode == 0 and "teacher" in third.stdout
    assert ranks and leaked == []  # the runner and the ranks never held the lock
    assert rc == 0, first.stderr.read()[-3000:]
    assert json.loads((run / "teacher" / "DONE.json").read_text())["produced"]["steps"] == 8
    # The refused launch wrote nothing: the driver's log has the first run's header only.
    assert (run / "logs" / "pipeline.log").read_text().count("=== ") == 1
