"""One run per run directory: the launching process holds an exclusive OS lock on `<run_dir>/stablekd.lock`
for the length of `run`, `stage` or `quickstart`; a second launch on the same directory is refused at once,
naming the host and pid that hold it. Two launches writing one `teacher/ckpt/` mix their checkpoints.

`flock` rather than a marker file: the kernel drops the lock when its holder's last descriptor closes,
so a launcher killed outright (kill -9, the OOM killer, a lost node) leaves no stale lock behind. The
descriptor is close-on-exec (os.open's default, PEP 446) and never passed to children: a flock belongs to
the open file description, which an inherited descriptor shares, so a DeepSpeed runner or rank that
inherited it and outlived a killed launcher would keep the directory locked with nobody left to name.

Only the node that prepares the directory takes it (node 0 with launch.no_ssh: the others meet it on the
handshake, launcher/driver/nodes.py); `status`, `ds-config` and `--dry-run` only read and never take it. On a
network filesystem the lock is as good as the filesystem's locking (NFSv4 maps flock onto its own locks).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stablekd.launcher.config import ConfigError

LOCK_FILE = "stablekd.lock"


def lock_path(run_dir: Path) -> Path:
    return Path(run_dir) / LOCK_FILE


def holder(run_dir: Path) -> dict:
    """What the holder wrote into the lock file ({"host", "pid", "since"}); {} if nothing (yet)."""
    try:
        return json.loads(lock_path(run_dir).read_text() or "{}")
    except (OSError, ValueError):
        return {}


@contextmanager
def hold(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir`'s lock while the block runs; a ConfigError (one line: who holds it) if another
    process does. The directory is created if needed (the lock file lives in it)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = lock_path(run_dir)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # The holder writes its name right after locking: a launch that lost the race by microseconds
            # may read the file before that, so look twice.
            who = holder(run_dir) or (time.sleep(0.2), holder(run_dir))[1]
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(who["since"])) if who else ""
            by = f"pid {who['pid']} on host {who['host']} (since {since})" if who else "another process"
            raise ConfigError(
                f"{run_dir} is in use: stablekd {by} holds {path}; wait for that run to end or stop it, "
                "or use another run.out_dir"
            ) from None
        # Written in one write() after truncating: a reader sees the whole line or nothing.
        os.ftruncate(fd, 0)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        os.pwrite(fd, json.dumps(record).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock (the file stays: deleting it would race a launch opening it)
