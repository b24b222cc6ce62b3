"""A real Slurm: Debian's slurmctld and two slurmd's with munge, started here, each slurmd in a network
namespace of its own (the two "nodes" of tests/test_multinode.py), running launcher/slurm/srun.sbatch.

One run directory, two submissions of the same `sbatch --nodes=2` command (the teacher stage of the tiny
config): in the first, node B's rank is killed with -9 after a checkpoint: the job fails and its output
holds stablekd's one line naming the lost rank; the second resumes and completes (exit 0, DONE.json). The
losses of both attempts together must equal the plain single-process reference, so the resume started
from the last complete checkpoint (same tolerance and reasoning as tests/test_teacher_distributed.py).
Two jobs, not three: each costs ~40 s of start-up on 2 busy cores. `scancel` was tried by hand on this
cluster (docs/slurm.md says what it showed), not here. A third job runs launcher/slurm/deepspeed_runner.sbatch
(the deepspeed runner's own slurm backend: srun from the batch host starts every rank) to the same losses.

How the cluster is made, and why: `ip netns exec` mounts a fresh /sys, which hides /sys/fs/cgroup, and
slurmd 22.05 initialises its cgroup plugin even with proctrack/linuxproc and task/none ("No filesystem
mounted on /sys/fs/cgroup", then it exits): so every daemon enters its namespace's network only
(`nsenter --net`). munged keeps its own key and socket in the cluster's directory (AuthInfo=socket=...).
The veth ends have one name, skd0, in both namespaces, so one GLOO_SOCKET_IFNAME in the job's environment
fits every node. Clients (sbatch, scancel, scontrol) run in node A's namespace, where slurmctld listens.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from stablekd.launcher.rank.monitor import read_scalars
from tests.conftest import QUICKSTART, REPO, TINY
from tests.test_teacher_distributed import reference_losses

TOOLS = (
    "slurmctld",
    "slurmd",
    "munged",
    "mungekey",
    "sbatch",
    "scancel",
    "scontrol",
    "sinfo",
    "ip",
    "nsenter",
)
pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slurm,
    pytest.mark.skipif(
        os.geteuid() != 0 or any(shutil.which(t) is None for t in TOOLS),
        reason="needs root, Slurm (slurm-wlm: slurmctld, slurmd, sbatch) and munge for a real 2-node Slurm",
    ),
]
SCRIPTS = REPO / "launcher" / "slurm"
STEPS = 6
TIMEOUT_S = 20
NODES = (("nodeA", "10.213.9.1"), ("nodeB", "10.213.9.2"))


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


class Cluster:
    def __init__(self, root: Path, netns: list[str]) -> None:
        self.root, self.netns = root, netns
        self.conf = root / "slurm.conf"

    def client(self, *args: str) -> list[str]:
        """A Slurm command run where the controller is reachable (node A's network namespace)."""
        return ["nsenter", f"--net=/run/netns/{self.netns[0]}", *args]

    def env(self) -> dict[str, str]:
        """The submitter's environment, which the job inherits: `stablekd` on PATH, gloo on the veth."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        path = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return dict(
            env, SLURM_CONF=str(self.conf), PATH=path, GLOO_SOCKET_IFNAME="skd0", PYTHONWARNINGS="ignore"
        )

    def job(self, job_id: str) -> dict[str, str]:
        out = subprocess.run(
            self.client("scontrol", "show", "job", "--oneliner", job_id),
            env=self.env(),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.root.glob("*.log")))


def _slurm_conf(root: Path) -> str:
    nodes = "".join(f"NodeName={n} NodeAddr={a} CPUs=1 State=UNKNOWN\n" for n, a in NODES)
    # SlurmctldHost must be this machine's name (slurmctld refuses to run elsewhere); the namespaces share it.
    return f"""ClusterName=stablekd
SlurmctldHost={socket.gethostname()}({NODES[0][1]})
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/linear
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=5
MinJobAge=600
{nodes}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm():
    """slurmctld and slurmd nodeA in namespace A (10.213.9.1), slurmd nodeB in B (10.213.9.2), munged on
    the host. Torn down whatever happens: every process in the two namespaces is killed (daemons, job
    steps, ranks), then munged, the namespaces and the directory go."""
    # munged wants every directory above its socket searchable by all: not pytest's 0700 tmp_path.
    root = Path(tempfile.mkdtemp(prefix="stablekd-slurm-"))
    root.chmod(0o755)
    tag = str(os.getpid())[-5:]
    netns = [f"skdsA{tag}", f"skdsB{tag}"]
    cluster, daemons = Cluster(root, netns), []
    try:
        for ns in netns:
            sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", f"sA{tag}", "type", "veth", "peer", "name", f"sB{tag}")
        for ns, end, (_, addr) in zip(netns, ("sA", "sB"), NODES, strict=True):
            sh("ip", "link", "set", f"{end}{tag}", "netns", ns)
            sh("ip", "-n", ns, "link", "set", f"{end}{tag}", "name", "skd0")
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "skd0")
            sh("ip", "-n", ns, "link", "set", "skd0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        for d in ("state", "spool/nodeA", "spool/nodeB"):
            (root / d).mkdir(parents=True)
        sh("mungekey", "--create", f"--keyfile={root}/munge.key")
        cluster.conf.write_text(_slurm_conf(root))
        env = cluster.env()

        def start(cmd: list[str], log: str) -> None:
            with open(root / log, "w") as f:
                daemons.append(subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT))

        start(
            ["munged", "--foreground", f"--socket={root}/munge.socket", f"--key-file={root}/munge.key"]
            + [
                f"--pid-file={root}/munged.pid",
                f"--seed-file={root}/munged.seed",
                f"--log-file={root}/munged.log",
            ],
            "munged.out.log",
        )
        deadline = time.time() + 10
        while not (root / "munge.socket").exists():
            assert time.time() < deadline and daemons[0].poll() is None, cluster.logs()
            time.sleep(0.05)
        start(cluster.client("slurmctld", "-D", "-i"), "slurmctld.out.log")
        for ns, (name, _) in zip(netns, NODES, strict=True):
            start(["nsenter", f"--net=/run/netns/{ns}", "slurmd", "-D", "-N", name], f"slurmd.{name}.out.log")
        deadline = time.time() + 30
        while True:
            out = subprocess.run(
                cluster.client("sinfo", "--noheader", "--Node", "--format=%N %T"),
                env=env,
                capture_output=True,
                text=True,
            ).stdout
            if out.split() == ["nodeA", "idle", "nodeB", "idle"]:
                break
            assert time.time() < deadline, f"nodes not idle: {out!r}\n{cluster.logs()}"
            time.sleep(0.2)
        yield cluster
    finally:
        for ns in netns:  # daemons, slurmstepd's, batch scripts, launchers, ranks: all that runs in them
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                subprocess.run(["kill", "-9", pid], capture_output=True)
        for d in daemons:
            d.kill()
            d.wait()
        for ns in netns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _submit(
    cluster: Cluster, run: Path, out: Path, script: str = "srun.sbatch"
) -> tuple[subprocess.Popen, str]:
    """`sbatch --wait --nodes=2 <script> stage teacher ...` from the cluster's directory (the job's submit
    directory): the same command each time. Returns sbatch (it exits with the job) and the job id."""
    args = ["stage", "teacher", str(QUICKSTART), *TINY, f"run.out_dir={run}"]
    args += ["launch.threads_per_rank=1", f"launch.timeout_s={TIMEOUT_S}"]
    args += ["teacher.ds_config=zero3.json", "teacher.dtype=fp32", f"teacher.max_steps={STEPS}"]
    args += ["teacher.save_every=2"]
    cmd = cluster.client(
        "sbatch", "--wait", "--parsable", "--nodes=2", f"--output={out}", str(SCRIPTS / script), *args
    )
    proc = subprocess.Popen(cmd, cwd=cluster.root, env=cluster.env(), stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip().split(";")[0]


def _wait_for_checkpoint(proc: subprocess.Popen, run: Path, step: int, out: Path) -> int:
    marker = run / "teacher" / "ckpt" / "complete.json"
    deadline = time.time() + 300
    while not (marker.exists() and json.loads(marker.read_text())["step"] >= step):
        assert proc.poll() is None, f"job ended before a checkpoint at step {step}\n{out.read_text()[-3000:]}"
        assert time.time() < deadline, f"no checkpoint at step {step}\n{out.read_text()[-3000:]}"
        time.sleep(0.05)
    return json.loads(marker.read_text())["step"]


def _last_complete(run: Path) -> int:
    return json.loads((run / "teacher" / "ckpt" / "complete.json").read_text())["step"]


def test_sbatch_two_nodes_kill_a_rank_resume_and_match_plain_pytorch(slurm, tmp_path):
    run = tmp_path / "run"

    # 1. After the checkpoint of step 2 node B's rank is killed with -9: the job fails, and its output holds
    #    stablekd's one line naming the lost rank (Slurm's --kill-on-bad-exit then ends the other node).
    out = tmp_path / "job1.out"
    proc, job = _submit(slurm, run, out)
    _wait_for_checkpoint(proc, run, 2, out)
    status = json.loads((run / "logs" / "ranks" / "teacher.r00001.json").read_text())
    assert status["state"] == "running", status
    os.kill(status["pid"], 9)
    killed = time.time()
    assert proc.wait(timeout=TIMEOUT_S + 60) != 0
    text = out.read_text()
    assert time.time() - killed < TIMEOUT_S + 30, text[-3000:]
    assert "stablekd: stage teacher failed (exit " in text, text[-3000:]
    assert f"lost rank 1 (pid {status['pid']} on node 1, nodeB): ended without a word" in text, text[-3000:]
    assert slurm.job(job)["JobState"] == "FAILED"
    assert not (run / "teacher" / "DONE.json").exists()
    resumed = _last_complete(run)

    # 2. The same sbatch, resubmitted: resumes from the last complete checkpoint and completes.
    out = tmp_path / "job2.out"
    proc, job = _submit(slurm, run, out)
    assert proc.wait(timeout=600) == 0, f"{out.read_text()[-3000:]}\n{slurm.logs()}"
    text = out.read_text()
    assert f"stablekd: [teacher] started, resuming from step {resumed}" in text, text[-3000:]
    assert slurm.job(job)["JobState"] == "COMPLETED"
    assert not (slurm.root / f"slurm-{job}.hosts").exists()  # the script's hostfile, removed at its end
    done = json.loads((run / "teacher" / "DONE.json").read_text())
    assert done["produced"]["world_size"] == 2 and done["produced"]["steps"] == STEPS
    got = read_scalars(run / "tb" / "teacher", "train/loss")  # both attempts' steps: one curve
    assert [got[s] for s in range(1, STEPS + 1)] == pytest.approx(
        reference_losses(run, STEPS, accum=1), rel=2e-4
    )


def test_deepspeed_runner_slurm_backend_sbatch_two_nodes_matches_plain_pytorch(slurm, tmp_path):
    run, out = tmp_path / "run", tmp_path / "job.out"
    proc, job = _submit(slurm, run, out, "deepspeed_runner.sbatch")
    assert proc.wait(timeout=600) == 0, f"{out.read_text()[-3000:]}\n{slurm.logs()}"
    assert slurm.job(job)["JobState"] == "COMPLETED"
    log = (run / "logs" / "teacher.log").read_text()
    assert "--launcher slurm" in log and not (run / "logs" / "teacher.node1.log").exists()  # one launcher
    done = json.loads((run / "teacher" / "DONE.json").read_text())  # 2 ranks on 2 nodes of 1 CPU: one each
    assert done["produced"]["world_size"] == 2 and done["produced"]["steps"] == STEPS
    got = read_scalars(run / "tb" / "teacher", "train/loss")
    assert [got[s] for s in range(1, STEPS + 1)] == pytest.approx(
        reference_losses(run, STEPS, accum=1), rel=2e-4
    )
