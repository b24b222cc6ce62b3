"""Build and run the `deepspeed` runner command for a stage: one node, a hostfile, or one node of many.

Thin on purpose (gpt-neox's deepy.py): we resolve config and hand off to DeepSpeed's own runner, as an
argument list (never a shell string). The ranks run `python -m stablekd.launcher.worker <stage> <run_dir>`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from stablekd.launcher.config import ExperimentConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads_per_rank(cfg: ExperimentConfig) -> int:
    """Cores ÷ local ranks unless set: two ranks each taking every core run at half speed (DESIGN §9)."""
    return cfg.launch.threads_per_rank or max(1, (os.cpu_count() or 1) // cfg.launch.nproc_per_node)


def runner_command(cfg: ExperimentConfig, stage: str) -> list[str]:
    """The deepspeed runner invocation, e.g. for 2 CPU ranks on this node:
    python -m deepspeed.launcher.runner --num_accelerators 2 --master_port P --log_level warning
        --no_local_rank --module stablekd.launcher.worker teacher runs/quickstart
    """
    launch = cfg.launch
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    cmd += ["--num_gpus" if torch.cuda.is_available() else "--num_accelerators", str(launch.nproc_per_node)]
    if launch.hostfile:
        cmd += ["--hostfile", launch.hostfile, "--launcher", launch.launcher]
        if launch.no_ssh:
            cmd += ["--no_ssh", "--node_rank", str(launch.node_rank)]
    if launch.master_addr:
        cmd += ["--master_addr", launch.master_addr]
    port = launch.master_port or (_free_port() if not launch.hostfile else 29500)
    cmd += ["--master_port", str(port), "--log_level", "warning", "--no_local_rank"]
    cmd += ["--module", "stablekd.launcher.worker", stage, str(cfg.run_dir)]
    return cmd


def write_deepspeed_env(cfg: ExperimentConfig, env: dict[str, str]) -> Path:
    """Environment for ranks on other nodes (the runner exports it through pdsh/mpirun).

    `KEY=VALUE` lines only: the runner crashes on comments (DESIGN §8).
    """
    keep = {
        k: v
        for k, v in env.items()
        if k in ("OMP_NUM_THREADS", "PYTHONPATH") or k.startswith(("GLOO_", "NCCL_"))
    }
    path = (cfg.run_dir / ".deepspeed_env").resolve()
    path.write_text("".join(f"{k}={v}\n" for k, v in sorted(keep.items())))
    return path


def run_stage(cfg: ExperimentConfig, stage: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads_per_rank(cfg)))
    if cfg.launch.hostfile:
        env["DS_ENV_FILE"] = str(write_deepspeed_env(cfg, env))
    cmd = runner_command(cfg, stage)
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise SystemExit(
            f"stablekd: stage {stage} failed (exit {result.returncode}); command: {' '.join(cmd)}"
        )
