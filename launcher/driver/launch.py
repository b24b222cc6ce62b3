"""The command that starts a stage's ranks: DeepSpeed's per-node launcher on one node (or on each node of a
launch.no_ssh run), DeepSpeed's runner for a hostfile job it spreads over the nodes itself (pdsh, openmpi,
slurm); on the whole pool, or on the slots launcher/placement.py gives it (two jobs side by side).

Thin on purpose (gpt-neox's deepy.py): we resolve config and hand off to DeepSpeed's own launchers, as an
argument list (never a shell string). The ranks run `python -m stablekd.launcher.rank.worker <stage> <run_dir>`.
Running the command is launcher/driver/supervise.py's; what of its output reaches the terminal, console.py's.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shlex
import socket
import sys
import tempfile
from pathlib import Path

from stablekd.data_pipeline.files import atomic_write
from stablekd.ds_configs.resolve import cuda_available
from stablekd.launcher import placement
from stablekd.launcher.config import ExperimentConfig
from stablekd.launcher.driver import nodes

WORKER = "stablekd.launcher.rank.worker"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_command(cfg: ExperimentConfig, stage: str) -> list[str]:
    """The runner for a hostfile job it starts on every node (pdsh/openmpi/slurm), else the per-node launcher."""
    if cfg.launch.hostfile and not cfg.launch.no_ssh:
        return runner_command(cfg, stage)
    return node_command(cfg, stage)


def _port(cfg: ExperimentConfig, stage: str) -> int:
    launch = cfg.launch
    port = launch.master_port or (free_port() if not launch.hostfile else nodes.DEFAULT_MASTER_PORT)
    if stage == "distill" and placement.concurrent(cfg) and (launch.master_port or launch.hostfile):
        port += 2  # not soft_labels' port, nor the one above it (a multi-node run's handshake store)
    return port


def node_command(cfg: ExperimentConfig, stage: str) -> list[str]:
    """DeepSpeed's per-node launcher for this node, e.g. 2 ranks on slots 0 and 1 of this machine:
    python -u -m deepspeed.launcher.launch --world_info=eyJsb2NhbGhvc3QiOiBbMCwgMV19 --master_addr=127.0.0.1
        --master_port=P --module --no_local_rank --log_level=warning stablekd.launcher.rank.worker teacher RUN
    It is what DeepSpeed's runner runs on one node (`--world_info`: base64 of {"localhost": [0, 1]}, the
    slots of every node in hostfile order; `--node_rank`: which of them this one is, with launch.no_ssh).
    Started directly: the runner would only add a process that imports DeepSpeed to write those arguments,
    ~3 s at every stage's start. The launcher sets each rank's visible devices to its slot."""
    launch = cfg.launch
    # no_ssh: the address the nodes' handshake uses too (launcher/driver/nodes.py)
    addr = (launch.master_addr or placement.host_names(cfg)[0]) if launch.hostfile else "127.0.0.1"
    cmd = per_node_launcher(placement.slots(cfg, stage) or placement.pool(cfg), addr, _port(cfg, stage))
    if launch.no_ssh:
        cmd += [f"--node_rank={launch.node_rank}"]
    return [*cmd, "--module", "--no_local_rank", "--log_level=warning", WORKER, stage, str(cfg.run_dir)]


def per_node_launcher(slots: placement.Slots, addr: str, port: int) -> list[str]:
    """`python -u -m deepspeed.launcher.launch` for `slots` (host -> local slots, hostfile order) meeting at
    addr:port; its options and the script follow."""
    world_info = base64.urlsafe_b64encode(json.dumps(slots).encode()).decode()
    return [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}",
            f"--master_addr={addr}", f"--master_port={port}"]  # fmt: skip


def runner_command(cfg: ExperimentConfig, stage: str) -> list[str]:
    """The deepspeed runner invocation for a hostfile job, e.g. on every node's 4 slots over pdsh:
    python -m deepspeed.launcher.runner --num_gpus 4 --hostfile HOSTFILE --launcher pdsh --master_addr A
        --master_port P --log_level warning --no_local_rank --module stablekd.launcher.rank.worker teacher RUN
    A job placed on part of the pool (launcher/placement.py) names its slots with --include instead.
    """
    launch, placed = cfg.launch, placement.slots(cfg, stage)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    srun, cuda = slurm_runner(cfg), cuda_available()
    if placed is None and not (srun and not cuda):
        cmd += [
            "--num_gpus" if cuda else "--num_accelerators",
            str(launch.nproc_per_node),
        ]
    elif placed is not None:
        cmd += ["--include", placement.include_arg(placed)]
    cmd += ["--hostfile", launch.hostfile, "--launcher", launch.launcher]
    addr = launch.master_addr
    if addr and placed and next(iter(placed)) != placement.host_names(cfg)[0]:
        addr = next(iter(placed))  # its rank 0 is on its first host, which the runner reaches by that name
    if addr:
        cmd += ["--master_addr", addr]
    cmd += ["--master_port", str(_port(cfg, stage)), "--log_level", "warning", "--no_local_rank"]
    if srun:
        # The runner's slurm backend ignores --module (it runs `python -u <script>`), checks ssh to the
        # first host unless told not to, and turns --num_accelerators into srun's --gpus-per-node (a GPU
        # request a CPU cluster refuses: "Invalid generic resource"): the hostfile's slots= count instead.
        worker = importlib.util.find_spec(WORKER).origin  # its file, without importing it
        cmd += ["--no_ssh_check", worker, stage, str(cfg.run_dir)]
    else:
        cmd += ["--module", WORKER, stage, str(cfg.run_dir)]
    return cmd


def slurm_runner(cfg: ExperimentConfig) -> bool:
    """Whether the deepspeed runner starts the ranks itself through srun (launch.launcher=slurm with a
    hostfile, from inside a Slurm allocation): one `srun -n WORLD python -u worker.py ...`, no per-node
    DeepSpeed launcher, so the ranks read their numbers from Slurm (worker.slurm_rank_env)."""
    launch = cfg.launch
    return bool(launch.hostfile) and launch.launcher == "slurm" and not launch.no_ssh


def log_path(cfg: ExperimentConfig, stage: str) -> Path:
    """`<run_dir>/logs/<stage>.log`; with launch.no_ssh, nodes other than 0 write `<stage>.node<r>.log`
    (every node runs its own launcher, and the run directory is shared)."""
    node = cfg.launch.node_rank if cfg.launch.no_ssh and cfg.launch.node_rank > 0 else 0
    return cfg.run_dir / "logs" / (f"{stage}.node{node}.log" if node else f"{stage}.log")


def deepspeed_env_path(cfg: ExperimentConfig) -> Path:
    return (cfg.run_dir / ".deepspeed_env").resolve()


def stage_env(cfg: ExperimentConfig, stage: str) -> dict[str, str]:
    """The environment variables a stage's job gets on top of ours (written nowhere: see run_stages)."""
    env = {"OMP_NUM_THREADS": str(placement.threads_per_rank(cfg))}
    if cfg.launch.hostfile:
        env["DS_ENV_FILE"] = str(deepspeed_env_path(cfg))
    if slurm_runner(cfg):
        # The runner hands --master_addr/--master_port to DeepSpeed's per-node launcher only; its srun
        # passes our environment instead (--export=ALL).
        cmd = runner_command(cfg, stage)
        env["MASTER_ADDR"] = (
            cmd[cmd.index("--master_addr") + 1] if "--master_addr" in cmd else placement.host_names(cfg)[0]
        )
        env["MASTER_PORT"] = cmd[cmd.index("--master_port") + 1]
    return env


def display_command(cfg: ExperimentConfig, stage: str) -> str:
    """The stage's job as one shell line (`--dry-run`): its environment, then the launcher's argument list."""
    return shlex.join([f"{k}={v}" for k, v in stage_env(cfg, stage).items()] + job_command(cfg, stage))


def write_deepspeed_env(cfg: ExperimentConfig, env: dict[str, str]) -> Path:
    """Environment for ranks on other nodes (the runner exports it through pdsh/mpirun).

    `KEY=VALUE` lines only: the runner crashes on comments.
    """
    keep = {
        k: v
        for k, v in env.items()
        if k in ("OMP_NUM_THREADS", "PYTHONPATH", "PYTHONUNBUFFERED") or k.startswith(("GLOO_", "NCCL_"))
    }
    path = deepspeed_env_path(cfg)
    # Every node of a launch.no_ssh run writes it in the shared run directory at once: a temp file of its
    # own (a shared `.deepspeed_env.tmp` was renamed away under another node's feet).
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    os.close(fd)
    atomic_write(path, "".join(f"{k}={v}\n" for k, v in sorted(keep.items())), tmp=Path(tmp))
    return path
