"""Each rank's last word, so that a failed job names the rank that was lost, not just an exit code.

A rank writes logs/ranks/<stage>.r<rank>.json when it starts ("running", pid, host) and again when it
ends: "done", "failed: <error>" or "stopped" (SIGTERM: the per-node launcher ends the others once one rank
has failed). A rank that never wrote its end was killed outright (SIGKILL, the OOM killer) or hung until
its launcher killed it: that is the lost one. DeepSpeed's launcher cannot say which rank it was (it
prints the shared command line), and the survivors' errors ("Connection closed by peer [addr]", a
collective timed out) name at most an address.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

from stablekd.data_pipeline.files import atomic_write


def status_path(run_dir: Path, stage: str, rank: int) -> Path:
    return Path(run_dir) / "logs" / "ranks" / f"{stage}.r{rank:05d}.json"


class RankStatus:
    """This rank's status file; `end` records how it ended. Installs a SIGTERM handler that records "stopped"."""

    def __init__(self, run_dir: Path, stage: str, rank: int) -> None:
        self.path = status_path(run_dir, stage, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.info = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        self.ended = False
        self._write("running")
        signal.signal(signal.SIGTERM, self._stopped)

    def _write(self, state: str) -> None:
        atomic_write(self.path, json.dumps({**self.info, "state": state, "at": time.time()}))

    def _stopped(self, signum, frame) -> None:
        # A rank that recorded its failure is stopped by the launcher as soon as it is seen (supervise.py),
        # often while it still prints its traceback: "stopped" must not overwrite the failure it names.
        if not self.ended:
            self._write("stopped")
        os._exit(128 + signum)  # as the launcher asks: no wait on collectives that will never complete

    def end(self, state: str) -> None:
        self._write(state)
        self.ended = True


def _statuses(run_dir: Path, stage: str, since: float) -> list[dict]:
    """The status records of the job of `stage` started at `since` (5 s of slack for other nodes' clocks)."""
    out = []
    for p in sorted((Path(run_dir) / "logs" / "ranks").glob(f"{stage}.r*.json")):
        try:
            s = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if s.get("started", 0) >= since - 5:
            out.append(s)
    return out


def states(run_dir: Path, stage: str, since: float) -> list[str]:
    """What each rank of the job started at `since` has recorded so far: "running", "done", "failed: ..."."""
    return [s["state"] for s in _statuses(run_dir, stage, since)]


def lost(run_dir: Path, stage: str, since: float, slots: dict[str, list[int]]) -> str:
    """What the status files of the job started at `since` say went wrong: the ranks that never recorded
    an end, else the first to fail; "" when they say nothing. `slots` (the job's hosts in hostfile order,
    each with its local slots) names the node of a rank: DeepSpeed numbers ranks host by host."""
    nodes = [(i, host) for i, (host, local) in enumerate(slots.items()) for _ in local]
    statuses = _statuses(run_dir, stage, since)

    def where(s: dict) -> str:
        on = "node {}, {}".format(*nodes[s["rank"]]) if s["rank"] < len(nodes) else s["host"]
        return f"rank {s['rank']} (pid {s['pid']} on {on})"

    silent = [s for s in statuses if s["state"] == "running"]
    if silent:
        return f"lost {', '.join(map(where, silent))}: ended without a word (SIGKILL, OOM killer, or hung)"
    failed = sorted((s for s in statuses if s["state"].startswith("failed")), key=lambda s: s["at"])
    return f"{where(failed[0])} {failed[0]['state']}" if failed else ""
