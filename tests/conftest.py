"""Shared test helpers: tiny runs launched through the real `stablekd` CLI and DeepSpeed runner."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "configs" / "quickstart.yaml"

# A teacher small enough that a 2-rank DeepSpeed step takes well under a second on 2 CPU cores.
TINY = [
    "teacher.model=tiny",
    "data.bios.people=20",
    "data.bios.unseen_people=4",
    "tokenizer.vocab_size=400",
    "data.seq_len=32",
    "teacher.micro_batch_size=4",
    "teacher.warmup_steps=2",
    "teacher.log_every=1",
    "teacher.eval_every=0",
    "teacher.eval_batches=2",
    "teacher.export_hf=false",
]


def benchmark_module(name: str):
    """benchmarks/<name>.py as a module (the folder is no package; its scripts import each other by name)."""
    folder = str(REPO / "benchmarks")
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(folder)


def stablekd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "stablekd.launcher.driver.cli", *args]


def run_group(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True) in a session of its own; on timeout the whole
    process group (the DeepSpeed runner and every rank) is killed and the test fails with the output's tail,
    so a hung job neither outlives its test nor holds the cores the next tests need."""
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"{shlex.join(cmd)} timed out after {timeout:.0f} s\n{out[-2000:]}\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_stablekd(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = run_group(stablekd_cmd(*args), timeout, cwd=REPO, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if check and proc.returncode != 0:
        pytest.fail(
            f"stablekd {' '.join(args)} exited {proc.returncode}\n--- stderr tail ---\n{proc.stderr[-4000:]}"
        )
    return proc


# The tiny teacher, its soft labels and candidate groups, for the distill and contrastive stage tests.
# Uneven on purpose: 7 sequences, one per shard (consumer rank 0 reads 4, rank 1 reads 3); 6 contexts.
UPSTREAM = [
    *TINY,
    "launch.nproc_per_node=2",
    "teacher.max_steps=6",
    "teacher.dtype=fp32",
    # The stage tests compare stored top-k log-probs with a plain teacher's: exact float16 values. The
    # default encoding (sampled) runs end to end in test_user_corpus; 8-bit values in test_encodings.
    "soft_labels.encoding=topk",
    "soft_labels.logprob_bits=16",
    "soft_labels.k=8",
    "soft_labels.temperature=2.0",
    "soft_labels.max_sequences=7",
    "soft_labels.records_per_shard=1",
    "soft_labels.micro_batch_size=2",
    "soft_labels.candidate_contexts=6",
    "soft_labels.candidates_per_context=2",
    "soft_labels.generate_batch_size=4",
    "soft_labels.max_new_tokens=8",
]


@pytest.fixture(scope="session")
def upstream(tmp_path_factory) -> Path:
    """A run directory after the teacher and soft_labels stages (2 ranks each)."""
    run = tmp_path_factory.mktemp("upstream") / "run"
    for stage in ("teacher", "soft_labels"):
        run_stablekd("stage", stage, str(QUICKSTART), f"run.out_dir={run}", *UPSTREAM)
    return run


def deepspeed_shm_buffers() -> set[str]:
    """Names of this user's DeepSpeed CPU all-reduce buffers in /dev/shm (engine.setup_distributed makes none)."""
    return {p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*")}


def copy_run(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    return dst


def kill_after_checkpoint(proc: subprocess.Popen, stage_dir: Path, step: int, timeout: float = 300) -> int:
    """SIGKILL the whole process group of `proc` (runner and every rank, started with
    start_new_session=True) once `stage_dir`/ckpt/complete.json names a step >= `step`; returns the step
    the rerun must resume from. Fails if the run ends first or no such checkpoint comes in time."""
    marker = stage_dir / "ckpt" / "complete.json"
    deadline = time.time() + timeout
    while not (marker.exists() and json.loads(marker.read_text())["step"] >= step):
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline, f"no checkpoint at step {step}"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (stage_dir / "DONE.json").exists()
    return json.loads(marker.read_text())["step"]
