"""The no_ssh node handshake on a real TCP store (launcher/driver/nodes.py) and the rank status files a failed
job is explained from (launcher/rank_status.py). The multi-node and dead-rank jobs themselves are in
tests/test_multinode.py and tests/test_dead_peers.py."""

from __future__ import annotations

import json
import threading
import time

import pytest

from stablekd.launcher import placement, rank_status
from stablekd.launcher.config import ConfigError, load_config
from stablekd.launcher.driver import nodes
from stablekd.launcher.driver.launch import free_port


def _cfgs(tmp_path, timeout_s=3):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\n127.0.0.1 slots=2\n127.0.0.2 slots=2\n")
    port = free_port()
    base = [f"launch.hostfile={hostfile}", "launch.no_ssh=true", "launch.master_addr=127.0.0.1",
            f"launch.master_port={port - 1}", f"launch.timeout_s={timeout_s}", f"run.out_dir={tmp_path}"]  # fmt: skip
    return [load_config(None, [*base, f"launch.node_rank={r}"]) for r in (0, 1)]


def _lead_in_thread(cfg, prepared: str) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def lead():
        try:
            nodes.lead(cfg, prepared)
            out["lead"] = "ok"
        except ConfigError as e:
            out["lead"] = str(e)

    t = threading.Thread(target=lead)
    t.start()
    return t, out


def test_hostfile_hosts_and_slots(tmp_path):
    node0, _ = _cfgs(tmp_path)
    assert placement.hosts(node0) == [("127.0.0.1", 2), ("127.0.0.2", 2)]
    assert placement.host_names(load_config(None, [])) == ["localhost"]


def test_nodes_meet_only_in_this_launch_and_only_on_one_config(tmp_path):
    node0, node1 = _cfgs(tmp_path)
    t, out = _lead_in_thread(node0, "abc")
    nodes.follow(node1, "abc")
    t.join()
    assert out == {"lead": "ok"}

    # Another config on node 1: both nodes refuse, each naming the other's hash.
    t, out = _lead_in_thread(node0, "abc")
    with pytest.raises(ConfigError, match="node 0 prepared another config .hash abc, node 1 xyz"):
        nodes.follow(node1, "xyz")
    t.join()
    assert "node 1 (127.0.0.2) runs config xyz" in out["lead"]

    # Node 0 gone: nothing left from the launches above is accepted; node 1 fails within the timeout.
    t0 = time.time()
    with pytest.raises(ConfigError, match="could not reach node 0's handshake store"):
        nodes.follow(node1, "abc")
    assert time.time() - t0 < 3 + 10

    # Node 1 never comes: node 0 fails within the timeout, naming it.
    t0 = time.time()
    with pytest.raises(ConfigError, match=r"node 1 \(127.0.0.2\) did not join within launch.timeout_s=3s"):
        nodes.lead(node0, "abc")
    assert time.time() - t0 < 3 + 5


def test_lost_rank_is_the_one_without_an_end(tmp_path, monkeypatch):
    started = time.time()
    monkeypatch.setattr("signal.signal", lambda *a: None)  # not this test process's SIGTERM handler
    status = [rank_status.RankStatus(tmp_path, "teacher", r) for r in range(4)]
    old = rank_status.status_path(tmp_path, "teacher", 5)  # a file of an earlier launch: not this job's
    old.write_text(
        json.dumps({"rank": 5, "pid": 1, "host": "h", "started": started - 600, "state": "running"})
    )
    slots = {"10.0.0.1": [0, 1], "10.0.0.2": [0, 1]}
    status[2].end("failed: RuntimeError: Connection closed by peer")
    status[0].end("stopped")
    status[1].end("stopped")
    # Rank 3 (node 1 with 2 ranks per node) never wrote an end: it is the one lost.
    msg = rank_status.lost(tmp_path, "teacher", started, slots)
    assert msg.startswith("lost rank 3 (pid ") and "on node 1, 10.0.0.2)" in msg and "rank 5" not in msg
    status[3].end("stopped")  # every rank ended: the first to fail is named
    msg = rank_status.lost(tmp_path, "teacher", started, slots)
    assert msg.startswith("rank 2 (pid ") and msg.endswith("failed: RuntimeError: Connection closed by peer")
    assert rank_status.lost(tmp_path, "distill", started, slots) == ""
    # A job on uneven slots (distill.include): its rank 1 is the second host's only one.
    placed = [rank_status.RankStatus(tmp_path, "distill", r) for r in range(2)]
    placed[0].end("stopped")
    msg = rank_status.lost(tmp_path, "distill", started, {"10.0.0.1": [3], "10.0.0.2": [0]})
    assert msg.startswith("lost rank 1 (pid ") and "on node 1, 10.0.0.2)" in msg
