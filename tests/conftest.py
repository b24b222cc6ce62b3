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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from tests import early_launch

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


def launch_script(script: Path, *args: str) -> list[str]:
    """DeepSpeed's per-node launcher running a test's worker script on 2 ranks of this node (as stablekd
    starts a stage on one node: launcher/driver/launch.py), on a free port."""
    from stablekd.launcher.driver.launch import free_port, per_node_launcher

    cmd = per_node_launcher({"localhost": [0, 1]}, "127.0.0.1", free_port())
    return [*cmd, "--no_local_rank", str(script), *args]


def run_stablekd(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = run_group(stablekd_cmd(*args), timeout, cwd=REPO, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if check and proc.returncode != 0:
        pytest.fail(
            f"stablekd {' '.join(args)} exited {proc.returncode}\n--- stderr tail ---\n{proc.stderr[-4000:]}"
        )
    return proc


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    early_launch.ordered(items)


@pytest.fixture(scope="session", autouse=True)
def _early_launches(request, tmp_path_factory):
    """Start the early launches the selected tests use (tests/early_launch.py)."""
    with early_launch.started(request.session.items, tmp_path_factory):
        yield


@pytest.fixture
def no_early_launches() -> None:
    """Every early launch has ended (tests/early_launch.py): nothing runs beside the test."""
    early_launch.wait_all()


# The tiny teacher, its soft labels and candidate groups, for the distill and contrastive stage tests.
# Uneven on purpose: 7 sequences, one per shard (consumer rank 0 reads 4, rank 1 reads 3); 6 contexts.
UPSTREAM = [
    *TINY,
    "launch.nproc_per_node=2",
    "teacher.max_steps=6",
    "teacher.dtype=fp32",
    "teacher.save_every=3",  # two tags, step3 and step6: a load of the wrong one shows (test_soft_labels_stage)
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


@early_launch.fixture()
def upstream(tmp_path_factory) -> Path:
    """A run directory after the teacher and soft_labels stages (2 ranks each)."""
    run = tmp_path_factory.mktemp("upstream") / "run"
    for stage in ("teacher", "soft_labels"):
        run_stablekd("stage", stage, str(QUICKSTART), f"run.out_dir={run}", *UPSTREAM)
    return run


# The hung job (tests/test_runlock.py, tests/test_dead_peers.py): a teacher that would run for minutes.
HUNG_TIMEOUT_S = 15


@early_launch.fixture()
def hung_job(tmp_path_factory) -> SimpleNamespace:
    """One 2-rank teacher job and what happened around it (one launch for two tests): once it has a
    checkpoint, rank 1 is stopped (SIGSTOP: alive but silent; launch.timeout_s=HUNG_TIMEOUT_S); while the
    job hangs, a second launch of the same command on its directory and `stablekd status` run side by
    side; then the job is waited for."""
    from stablekd.launcher.driver import runlock
    from stablekd.launcher.rank_status import status_path

    run = tmp_path_factory.mktemp("hung") / "run"
    args = ["stage", "teacher", str(QUICKSTART), *TINY, f"run.out_dir={run}", "launch.nproc_per_node=2",
            f"launch.timeout_s={HUNG_TIMEOUT_S}", "teacher.max_steps=5000", "teacher.save_every=2"]  # fmt: skip
    job = subprocess.Popen(
        stablekd_cmd(*args), cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    got = SimpleNamespace(run=run, pid=job.pid)
    marker = run / "teacher" / "ckpt" / "complete.json"
    try:
        deadline = time.time() + 300
        while not (marker.exists() and json.loads(marker.read_text())["step"] >= 2):
            assert job.poll() is None and time.time() < deadline, "no checkpoint at step 2"
            time.sleep(0.05)
        got.rank1 = json.loads(status_path(run, "teacher", 1).read_text())
        os.kill(got.rank1["pid"], signal.SIGSTOP)
        got.stopped = time.time()
        config = (run / "config.yaml").read_bytes()
        t0 = time.monotonic()
        with ThreadPoolExecutor(2) as pool:  # both within the timeout: the job holds the directory
            second = pool.submit(run_stablekd, *args, check=False)
            status = pool.submit(run_stablekd, "status", str(run), check=False)  # reads only: takes no lock
            got.second, got.status = second.result(), status.result()
        got.refused_in = time.monotonic() - t0
        got.alive = job.poll() is None
        got.config_kept = (run / "config.yaml").read_bytes() == config
        got.holder = runlock.holder(run)
        got.ranks = [p.pid for p in psutil.Process(job.pid).children(recursive=True)]
        got.lock_holders = [pid for pid in got.ranks if opened_by(pid, run / "stablekd.lock")]
        got.out = job.communicate(timeout=HUNG_TIMEOUT_S + 60)[0]
        got.took = time.time() - got.stopped
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    got.returncode = job.returncode
    return got


def opened_by(pid: int, path: Path) -> bool:
    """Whether process `pid` has `path` open (its /proc fd links)."""
    fds = Path(f"/proc/{pid}/fd")
    return any(os.path.realpath(fd) == str(path.resolve()) for fd in fds.iterdir())


# The students of tests/test_distill_stage.py, which tests/test_contrastive_stage.py fine-tunes.
DISTILL = [
    "student.model=tiny-student",
    "distill.ds_config=zero3.json",
    "distill.dtype=fp32",
    "distill.max_steps=16",
    "distill.micro_batch_size=1",
    "distill.grad_accum=2",
    "distill.warmup_steps=2",
    "distill.lr=0.01",
    "distill.kind=gjsd",
    "distill.beta=0.3",
    "distill.temperature=2.0",
    "distill.alpha=0.6",
    "distill.save_every=2",
    "distill.eval_every=0",
    "distill.eval_batches=1",
    "distill.log_every=1",
]
# A Llama student with a byte-level BPE tokenizer of its own (hybrid KD across tokenizers), ZeRO-2.
XTOK = ["distill.cross_tokenizer=hybrid", "distill.max_steps=8", "distill.ds_config=zero2.json"]


def distill_args(run: Path, *extra: str) -> list[str]:
    return ["stage", "distill", str(QUICKSTART), f"run.out_dir={run}", *UPSTREAM, *DISTILL, *extra]


@early_launch.fixture("upstream")
def distilled(tmp_path_factory, upstream: Path) -> Path:
    """`upstream` after a 16-step ZeRO-3 distillation of the tiny student (2 ranks)."""
    run = copy_run(upstream, tmp_path_factory.mktemp("full") / "run")
    run_stablekd(*distill_args(run))
    return run


@early_launch.fixture("upstream")
def xtok_distilled(tmp_path_factory, upstream: Path) -> SimpleNamespace:
    """`upstream` after the distillation of a student with its own tokenizer (XTOK), killed with SIGKILL
    after a checkpoint and rerun to the end: the run, the student's directory, its tokenizer, the step the
    rerun resumed from, the first launch's curve and the rerun's output."""
    from stablekd.launcher.rank.monitor import read_scalars
    from tests.hf_models import byte_level_tokenizer, model_dir

    root = tmp_path_factory.mktemp("xtok")
    bpe = root / "bpe"
    student = model_dir(root / "student", "llama", byte_level_tokenizer(bpe, 300), 320, positions=32)
    run = copy_run(upstream, root / "run")
    args = distill_args(run, f"student.model={student}", *XTOK)
    proc = subprocess.Popen(
        stablekd_cmd(*args), cwd=REPO, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    resumed_from = kill_after_checkpoint(proc, run / "student", 4)
    first = read_scalars(run / "tb" / "distill", "train/loss")
    out = run_stablekd(*args)
    return SimpleNamespace(run=run, student=student, bpe=bpe, resumed_from=resumed_from, first=first, out=out)


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
