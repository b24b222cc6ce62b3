"""Two "nodes" for real: two network namespaces joined by a veth pair, one rank each, started the way a
user without passwordless ssh starts them (`launch.no_ssh=true launch.node_rank=R` on every node; they
meet in the handshake of launcher/driver/nodes.py).

Node 1 is killed after a checkpoint: node 0 must exit non-zero naming it, within launch.timeout_s plus a
margin; the same two commands then resume, and the 2-node ZeRO-3 run's losses, both attempts together,
must equal the plain single-process reference (same tolerance and reasoning as
tests/test_teacher_distributed.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from stablekd.launcher.rank.monitor import read_scalars
from tests.conftest import QUICKSTART, REPO, TINY, stablekd_cmd
from tests.test_teacher_distributed import reference_losses

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None,
        reason="needs root and iproute2 for network namespaces",
    ),
]
STEPS = 6
TIMEOUT_S = 20


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@pytest.fixture
def two_hosts():
    """Namespaces A and B with veth ends vA 10.213.7.1 and vB 10.213.7.2 (addresses only these namespaces have)."""
    tag = str(os.getpid())[-5:]
    ns, veth = [f"skdA{tag}", f"skdB{tag}"], [f"vA{tag}", f"vB{tag}"]
    addrs = ["10.213.7.1", "10.213.7.2"]
    sh("ip", "netns", "add", ns[0])
    sh("ip", "netns", "add", ns[1])
    try:
        sh("ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for n, v, a in zip(ns, veth, addrs, strict=True):
            sh("ip", "link", "set", v, "netns", n)
            sh("ip", "-n", n, "addr", "add", f"{a}/24", "dev", v)
            sh("ip", "-n", n, "link", "set", v, "up")
            sh("ip", "-n", n, "link", "set", "lo", "up")
        yield list(zip(ns, veth, addrs, strict=True))
    finally:
        for n in ns:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


def _start_nodes(two_hosts, run, hostfile) -> list[subprocess.Popen]:
    procs = []
    for rank, (ns, veth, _) in enumerate(two_hosts):
        args = [
            "stage",
            "teacher",
            str(QUICKSTART),
            *TINY,
            f"run.out_dir={run}",
            f"launch.hostfile={hostfile}",
        ]
        args += ["launch.nproc_per_node=1", "launch.no_ssh=true", f"launch.node_rank={rank}"]
        args += [f"launch.master_addr={two_hosts[0][2]}", "launch.master_port=29677"]
        args += ["launch.threads_per_rank=1", f"launch.timeout_s={TIMEOUT_S}"]
        args += ["teacher.ds_config=zero3.json", "teacher.dtype=fp32", f"teacher.max_steps={STEPS}"]
        args += ["teacher.save_every=2"]
        env = dict(os.environ, GLOO_SOCKET_IFNAME=veth, PYTHONWARNINGS="ignore")
        procs.append(
            subprocess.Popen(
                ["ip", "netns", "exec", ns, *stablekd_cmd(*args)],
                cwd=REPO,
                env=env,
                start_new_session=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
        )
    return procs


def test_two_nodes_over_veth_lose_a_node_resume_and_match_plain_pytorch(two_hosts, tmp_path):
    run = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{addr} slots=1\n" for _, _, addr in two_hosts))

    # Node 1 dies (every process of it killed) after the checkpoint of step 2: node 0 must not hang.
    procs = _start_nodes(two_hosts, run, hostfile)
    marker = run / "teacher" / "ckpt" / "complete.json"
    deadline = time.time() + 300
    while not (marker.exists() and json.loads(marker.read_text())["step"] >= 2):
        assert all(p.poll() is None for p in procs) and time.time() < deadline, "no checkpoint at step 2"
        time.sleep(0.05)
    os.killpg(procs[1].pid, signal.SIGKILL)
    killed = time.time()
    out0 = procs[0].communicate(timeout=TIMEOUT_S + 60)[0]
    procs[1].wait()
    assert procs[0].returncode != 0 and time.time() - killed < TIMEOUT_S + 30, out0[-3000:]
    assert "lost rank 1 (pid" in out0 and f"on node 1, {two_hosts[1][2]})" in out0, out0[-3000:]
    assert not (run / "teacher" / "DONE.json").exists()

    # The same commands on both nodes resume from the last complete checkpoint and finish.
    procs = _start_nodes(two_hosts, run, hostfile)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "resuming from step" in outs[0]

    done = json.loads((run / "teacher" / "DONE.json").read_text())
    assert done["produced"]["world_size"] == 2 and done["produced"]["steps"] == STEPS
    tag = json.loads(marker.read_text())["tag"]
    shards = sorted(p.name for p in (run / "teacher" / "ckpt" / tag).glob("zero_pp_rank_*_model_states.pt"))
    assert shards == [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(2)]
    got = read_scalars(run / "tb" / "teacher", "train/loss")  # both attempts' steps: the resumed curve
    assert [got[s] for s in range(1, STEPS + 1)] == pytest.approx(
        reference_losses(run, STEPS, accum=1), rel=2e-4
    )
