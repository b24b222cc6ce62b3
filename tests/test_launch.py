"""The command that starts a stage's ranks, as an argument list: DeepSpeed's per-node launcher for one node
or one node of many (launch.no_ssh), its runner for a hostfile job."""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from stablekd.launcher.config import load_config
from stablekd.launcher.driver.launch import job_command, runner_command, stage_env, write_deepspeed_env
from stablekd.launcher.driver.supervise import STALE_BUILD_LOCK_S, run_stage, stale_build_locks
from stablekd.launcher.placement import threads_per_rank, world_size
from stablekd.launcher.rank import worker
from stablekd.launcher.rank.worker import slurm_rank_env
from tests.conftest import QUICKSTART


def _world_info(cmd: list[str]) -> dict[str, list[int]]:
    (arg,) = [a for a in cmd if a.startswith("--world_info=")]
    return json.loads(base64.urlsafe_b64decode(arg.split("=", 1)[1]))


def test_single_node_command(tmp_path):
    cfg = load_config(
        QUICKSTART, [f"run.out_dir={tmp_path}", "launch.nproc_per_node=2", "launch.master_port=29555"]
    )
    cmd = job_command(cfg, "teacher")
    assert cmd[:4] == [sys.executable, "-u", "-m", "deepspeed.launcher.launch"]
    assert _world_info(cmd) == {"localhost": [0, 1]}  # what the runner's --num_accelerators 2 gives
    assert "--master_addr=127.0.0.1" in cmd and "--master_port=29555" in cmd
    assert cmd[-6:] == ["--module", "--no_local_rank", "--log_level=warning", "stablekd.launcher.rank.worker",
                        "teacher", str(tmp_path)]  # fmt: skip
    assert all(isinstance(a, str) for a in cmd) and not any(a.startswith("--node_rank") for a in cmd)
    auto = job_command(load_config(QUICKSTART, ["launch.master_port=0"]), "teacher")
    (port,) = [a for a in auto if a.startswith("--master_port=")]
    assert 0 < int(port.split("=")[1]) < 65536  # a free port picked for us


def test_hostfile_and_no_ssh_commands(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-a slots=4\nnode-b slots=4\n")
    common = [
        f"run.out_dir={tmp_path}",
        f"launch.hostfile={hostfile}",
        "launch.nproc_per_node=4",
        "launch.master_addr=10.0.0.1",
        "launch.master_port=29600",
    ]
    cfg = load_config(QUICKSTART, common)
    cmd = job_command(cfg, "teacher")  # the runner starts every node's launcher over pdsh
    assert cmd[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert cmd[cmd.index("--hostfile") + 1] == str(hostfile) and cmd[cmd.index("--launcher") + 1] == "pdsh"
    assert cmd[cmd.index("--master_addr") + 1] == "10.0.0.1" and "--no_ssh" not in cmd
    assert world_size(cfg) == 8
    # launch.no_ssh: each node starts its own per-node launcher, told the whole world and which node it is.
    per_node = job_command(
        load_config(QUICKSTART, [*common, "launch.no_ssh=true", "launch.node_rank=1"]), "teacher"
    )
    assert per_node[:4] == [sys.executable, "-u", "-m", "deepspeed.launcher.launch"]
    assert _world_info(per_node) == {"node-a": [0, 1, 2, 3], "node-b": [0, 1, 2, 3]}
    assert "--node_rank=1" in per_node and "--master_addr=10.0.0.1" in per_node
    unnamed = [*common[:3], "launch.no_ssh=true", "launch.node_rank=1"]  # no master_addr: the first host
    assert "--master_addr=node-a" in job_command(load_config(QUICKSTART, unnamed), "teacher")


def test_deepspeed_runner_slurm_backend_command_and_rank_environment(tmp_path):
    """launch.launcher=slurm: the runner's slurm backend runs `srun -n WORLD python -u <script>`, so the
    worker goes as a file (it ignores --module), ssh is not checked, a CPU run asks srun for no GPUs, and
    the ranks take their numbers from Slurm and the rendezvous from our environment (tests/test_slurm.py
    runs it for real)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=2\nnodeB slots=2\n")
    overrides = [f"run.out_dir={tmp_path}", f"launch.hostfile={hostfile}", "launch.nproc_per_node=2"]
    overrides += ["launch.launcher=slurm", "launch.master_addr=10.0.0.1", "launch.master_port=29600"]
    cfg = load_config(QUICKSTART, overrides)
    cmd = runner_command(cfg, "teacher")
    assert cmd[cmd.index("--launcher") + 1] == "slurm" and "--no_ssh_check" in cmd and "--module" not in cmd
    assert cmd[-3:] == [str(Path(worker.__file__)), "teacher", str(tmp_path)]
    if not torch.cuda.is_available():
        assert "--num_accelerators" not in cmd  # srun --gpus-per-node 2: "Invalid generic resource"
    env = stage_env(cfg, "teacher")
    assert env["MASTER_ADDR"] == "10.0.0.1" and env["MASTER_PORT"] == "29600"
    task = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_NODES": "2"}
    assert slurm_rank_env(task) == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
    }
    assert slurm_rank_env({**task, "RANK": "0"}) == {}  # DeepSpeed's launcher numbered it: left alone
    pdsh = runner_command(load_config(QUICKSTART, overrides[:3]), "teacher")
    assert pdsh[-4:-2] == ["--module", "stablekd.launcher.rank.worker"] and "MASTER_ADDR" not in stage_env(
        load_config(QUICKSTART, overrides[:3]), "teacher"
    )


def test_deepspeed_env_written_by_many_at_once(tmp_path):
    """Every node of a launch.no_ssh run writes it in the shared run directory at the same moment: none of
    the writers fails (a shared temp name did: renamed away by one writer before another's rename)."""
    cfg = load_config(QUICKSTART, [f"run.out_dir={tmp_path}", "launch.nproc_per_node=2"])
    tmp_path.mkdir(exist_ok=True)
    env = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "veth0"}
    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda _: write_deepspeed_env(cfg, env), range(400)))
    assert paths[0].read_text() == "GLOO_SOCKET_IFNAME=veth0\nOMP_NUM_THREADS=1\n"
    assert [p.name for p in tmp_path.iterdir()] == [".deepspeed_env"]  # no temp file left


def test_deepspeed_env_has_no_comments(tmp_path, monkeypatch):
    cfg = load_config(QUICKSTART, [f"run.out_dir={tmp_path}", "launch.nproc_per_node=2"])
    path = write_deepspeed_env(cfg, {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "veth0", "HOME": "/root"})
    assert (
        path.read_text() == "GLOO_SOCKET_IFNAME=veth0\nOMP_NUM_THREADS=1\n"
    )  # the runner crashes on comments
    assert threads_per_rank(cfg) == max(1, (os.cpu_count() or 1) // 2)  # cores ÷ the 2 local ranks
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert threads_per_rank(cfg) == 8  # the same on any machine: 16 cores ÷ 2 ranks
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # unknown: one core assumed
    assert threads_per_rank(cfg) == 1
    assert threads_per_rank(load_config(QUICKSTART, ["launch.nproc_per_node=4096"])) == 1  # never 0
    assert threads_per_rank(load_config(QUICKSTART, ["launch.threads_per_rank=3"])) == 3  # set: used as is


def test_a_stale_extension_build_lock_fails_the_stage_before_any_rank_waits_on_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    cfg = load_config(QUICKSTART, [f"run.out_dir={tmp_path / 'run'}"])
    building, killed = tmp_path / "ext" / "fused_adam" / "lock", tmp_path / "ext" / "cpu_adam" / "lock"
    for lock in (building, killed):
        lock.parent.mkdir(parents=True)
        lock.touch()
    old = time.time() - STALE_BUILD_LOCK_S - 1
    os.utime(killed, (old, old))
    assert stale_build_locks() == [killed]  # a build under way is not stale
    with pytest.raises(SystemExit, match=f"{killed}.*delete it and rerun"):
        run_stage(cfg, "teacher")
    assert not (tmp_path / "run" / "logs").exists()  # nothing was started
