"""Build and run the `deepspeed` runner command for a stage: one node, a hostfile, or one node of many;
on the whole pool, or on the slots launcher/placement.py gives it (two jobs side by side).

Thin on purpose (gpt-neox's deepy.py): we resolve config and hand off to DeepSpeed's own runner, as an
argument list (never a shell string). The ranks run `python -m stablekd.launcher.worker <stage> <run_dir>`.

Console: the runner's and the ranks' stdout and stderr come through one pipe per job. Every line goes to
`<run_dir>/logs/<stage>.log`; the terminal gets only our own lines (`stablekd: ...`, `[<stage>] ...`) and
rank 0's tqdm bar (the bars of jobs side by side share one line), unless `verbose`, which shows everything.
"""

from __future__ import annotations

import codecs
import logging
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import psutil
import torch

from stablekd.data_pipeline.files import atomic_write
from stablekd.launcher import nodes, placement, ranks
from stablekd.launcher.config import ExperimentConfig
from stablekd.launcher.stages import NAMES


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
    A job placed on part of the pool (launcher/placement.py) names its slots with --include instead.
    """
    launch, placed = cfg.launch, placement.slots(cfg, stage)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if placed is None:
        cmd += [
            "--num_gpus" if torch.cuda.is_available() else "--num_accelerators",
            str(launch.nproc_per_node),
        ]
    else:
        cmd += ["--include", placement.include_arg(placed)]
    if launch.hostfile:
        cmd += ["--hostfile", launch.hostfile, "--launcher", launch.launcher]
        if launch.no_ssh:
            cmd += ["--no_ssh", "--node_rank", str(launch.node_rank)]
    addr = launch.master_addr
    if addr and placed and launch.hostfile and next(iter(placed)) != nodes.host_names(cfg)[0]:
        addr = next(iter(placed))  # its rank 0 is on its first host, which the runner reaches by that name
    if addr:
        cmd += ["--master_addr", addr]
    port = launch.master_port or (_free_port() if not launch.hostfile else nodes.DEFAULT_MASTER_PORT)
    if stage == "distill" and placement.concurrent(cfg) and (launch.master_port or launch.hostfile):
        port += 2  # not soft_labels' port, nor the one above it (a multi-node run's handshake store)
    cmd += ["--master_port", str(port), "--log_level", "warning", "--no_local_rank"]
    cmd += ["--module", "stablekd.launcher.worker", stage, str(cfg.run_dir)]
    return cmd


def log_path(cfg: ExperimentConfig, stage: str) -> Path:
    """`<run_dir>/logs/<stage>.log`; with launch.no_ssh, nodes other than 0 write `<stage>.node<r>.log`
    (every node runs its own runner, and the run directory is shared)."""
    node = cfg.launch.node_rank if cfg.launch.no_ssh and cfg.launch.node_rank > 0 else 0
    return cfg.run_dir / "logs" / (f"{stage}.node{node}.log" if node else f"{stage}.log")


def deepspeed_env_path(cfg: ExperimentConfig) -> Path:
    return (cfg.run_dir / ".deepspeed_env").resolve()


def stage_env(cfg: ExperimentConfig, stage: str) -> dict[str, str]:
    """The environment variables a stage's job gets on top of ours (written nowhere: see run_stages)."""
    env = {"OMP_NUM_THREADS": str(threads_per_rank(cfg))}
    if cfg.launch.hostfile:
        env["DS_ENV_FILE"] = str(deepspeed_env_path(cfg))
    elif placement.slots(cfg, stage) is not None and not torch.cuda.is_available():
        # The runner checks --include against this node's slots, which DeepSpeed's CPU accelerator counts
        # from LOCAL_SIZE (else one per NUMA node). Its launcher sets each rank's own LOCAL_SIZE.
        env["LOCAL_SIZE"] = str(cfg.launch.nproc_per_node)
    return env


def display_command(cfg: ExperimentConfig, stage: str) -> str:
    """The stage's job as one shell line (`--dry-run`): its environment, then the runner's argument list."""
    return shlex.join([f"{k}={v}" for k, v in stage_env(cfg, stage).items()] + runner_command(cfg, stage))


def write_deepspeed_env(cfg: ExperimentConfig, env: dict[str, str]) -> Path:
    """Environment for ranks on other nodes (the runner exports it through pdsh/mpirun).

    `KEY=VALUE` lines only: the runner crashes on comments (DESIGN §8).
    """
    keep = {
        k: v
        for k, v in env.items()
        if k in ("OMP_NUM_THREADS", "PYTHONPATH", "PYTHONUNBUFFERED") or k.startswith(("GLOO_", "NCCL_"))
    }
    path = deepspeed_env_path(cfg)
    atomic_write(path, "".join(f"{k}={v}\n" for k, v in sorted(keep.items())))
    return path


# --- console ---------------------------------------------------------------------------------------
# tqdm redraws its bar by writing "\r" + bar, e.g. "teacher:  42%|####   | 42/100 [00:10<00:14, 4.1it/s,
# loss=2.345]" (without a total: "teacher: 42it [00:10, 4.1it/s]"), padded with spaces to its last length.
_BAR = re.compile(r"[^\r\n]*?(?:\d+%\|[^|\r\n]*\|[^\[\r\n]*|\d+(?:\.\d+)?[kMGT]?it )\[[^\]\r\n]*\] *")
# Our own lines: the driver's `stablekd: ...` and a stage's `[<stage>] ...` (pdsh puts `host: ` first).
_OURS = re.compile(rf"(?:[\w.-]+: )?(?:stablekd:|\[(?:{'|'.join(NAMES)})\])")
# The last line of a Python traceback, e.g. "stablekd.launcher.config.ConfigError: distill: ...".
_ERROR = re.compile(r"(?:\[rank\d+\]:\s*)?[A-Za-z_][\w.]*(?:Error|Exception): \S")


class ConsoleFilter:
    """Splits a job's output into lines and tqdm bar updates: every line goes to `log`; `term` gets our
    own lines and the bar, or everything with `verbose`. Keeps the first exception line it sees (the rank
    that failed first; the others usually fail after it, on a closed connection)."""

    def __init__(self, log: TextIO, term: TextIO, verbose: bool = False) -> None:
        self.log, self.term, self.verbose = log, term, verbose
        self.first_error: str | None = None
        self._decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
        self._seg = ""  # text since the last \r or \n
        self._lead = "\n"  # the delimiter before it: "\r" starts a bar update
        self._shown = 0  # characters of _seg already on the terminal (a bar is shown as it arrives)
        self._on_bar = False  # the terminal's cursor sits on a bar's line ...
        self._cleared = False  # ... which tqdm blanked (it does before tqdm.write prints a line)

    def feed(self, data: bytes, final: bool = False) -> None:
        text = self._decode(data, final)
        if self.verbose:
            self.term.write(text)
        for piece in re.split(r"([\r\n])", text):
            if piece in ("\r", "\n"):
                self._end(piece)
            else:
                self._seg += piece
        if self._lead == "\r":
            self._show_bar(self._seg)  # an update ends only at the next one's "\r": show it now
        if final and self._seg:
            self._end("\n")
        self.term.flush()
        self.log.flush()

    def _show(self, text: str) -> None:
        if not self.verbose:  # verbose: feed already wrote everything
            self.term.write(text)

    def _show_bar(self, seg: str) -> int:
        """Put the bar at the start of `seg` on the terminal (the part not there yet); returns its end, 0 if none."""
        m = _BAR.match(seg)
        if not m:
            return 0
        if m.end() > self._shown:
            self._show(("\r" if self._shown == 0 else "") + seg[self._shown : m.end()])
            self._shown = m.end()
            self._on_bar, self._cleared = True, False
        return m.end()

    def _end(self, delim: str) -> None:
        seg, lead = self._seg, self._lead
        self._seg, self._lead = "", delim
        if seg or delim == "\n":  # an empty segment before a bar update is no line
            self._segment(seg, lead, delim)
        self._shown = 0

    def _segment(self, seg: str, lead: str, delim: str) -> None:
        if lead == "\r" and not seg.strip():  # tqdm blanking its line ("\r" + spaces + "\r"), or a CRLF
            if seg:
                self._show("\r" + seg)
                self._on_bar, self._cleared = True, True
        elif lead == "\r" and (end := self._show_bar(seg)):
            rest = seg[end:]  # another process's text written right after the bar, if any
            if rest.strip():
                self._line(rest)
            elif delim == "\n":  # the bar's last state (tqdm.close): the only bar state the log keeps
                self.log.write(seg.rstrip() + "\n")
                self._show("\n")
                self._on_bar = False
        else:
            self._line(seg)

    def _line(self, text: str) -> None:
        self.log.write(text + "\n")
        if self.first_error is None and _ERROR.match(text):
            self.first_error = text.strip()
        if _OURS.match(text):
            if self._on_bar:  # start the line at column 0, keeping a bar that was not blanked
                self._show("\r" if self._cleared else "\n")
                self._on_bar = False
            self._show(text + "\n")


# A torch extension build (DeepSpeed's cpu_adam for ZeRO offload, its fused Adam on GPU) holds its lock file
# for a few minutes at most; one older than this was left by a build killed mid-way.
STALE_BUILD_LOCK_S = 600


def stale_build_locks() -> list[Path]:
    """This machine's torch extension build locks older than STALE_BUILD_LOCK_S.

    torch's FileBaton has every process that loads an extension wait while the lock file exists, with no
    timeout and no owner to check: a process killed while holding it makes every later rank wait forever.
    """
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    stale = []
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:  # <root>[/py311_cpu]/<extension>/lock
        try:
            if time.time() - lock.stat().st_mtime > STALE_BUILD_LOCK_S:
                stale.append(lock)
        except FileNotFoundError:  # released since the glob: a build that just finished
            pass
    return sorted(stale)


class SideBySide:
    """One terminal for jobs that run at once (soft_labels beside distill): the bars of all of them share
    one line (`soft_labels: 40%|... │ distill: 12%|...`), their own lines print above it. Each job's
    ConsoleFilter writes to its `lane`, which reads back the bar states and lines the filter shows."""

    def __init__(self, term: TextIO, jobs: int) -> None:
        self.term, self.bars, self._width = term, [""] * jobs, 0

    def lane(self, i: int) -> _Lane:
        return _Lane(self, i)

    def _draw(self) -> None:
        joined = " │ ".join(b for b in self.bars if b)[: shutil.get_terminal_size().columns - 1]
        self.term.write("\r" + " " * self._width + "\r" + joined)  # blank the old bars first
        self._width = len(joined)

    def bar(self, i: int, text: str) -> None:
        self.bars[i] = text
        self._draw()

    def line(self, text: str) -> None:
        self._width, shown = 0, self._width  # blank what is shown, print the line, bars below it
        self.term.write("\r" + " " * shown + "\r" + text + "\n")
        self._draw()


class _Lane:
    """What a ConsoleFilter writes for one job ("\r" + bar, tqdm's blanking, "text\n" lines), replayed
    onto the shared line: a bar's state replaces the job's bar, "\n" after a bar leaves it printed."""

    def __init__(self, owner: SideBySide, i: int) -> None:
        self.owner, self.i, self.buf = owner, i, ""

    def write(self, text: str) -> None:
        for piece in re.split(r"([\r\n])", text):
            if piece == "\r":
                self.buf = ""
            elif piece == "\n":
                if self.buf.strip():
                    self.owner.bar(self.i, "")
                    self.owner.line(self.buf.rstrip())
                self.buf = ""
            elif piece:
                self.buf += piece
                if not self.buf.strip():
                    self.owner.bar(self.i, "")  # tqdm blanked its bar
                elif _BAR.match(self.buf):
                    self.owner.bar(self.i, self.buf.rstrip())

    def flush(self) -> None:
        self.owner.term.flush()


# After SIGTERM a rank has this long to record "stopped" and exit (DeepSpeed's launcher itself waits 30 s
# for its ranks) before the job's processes are killed: a rank blocked in a collective never returns.
STOP_GRACE_S = 40.0


@dataclass
class _Job:
    stage: str
    log: Path
    proc: subprocess.Popen
    console: ConsoleFilter
    last_data: float = 0.0  # time.monotonic() of its last output
    exited: float = 0.0  # when its runner was first seen exited
    open: bool = True
    ended: float = 0.0  # when its output ended
    stopping: list[psutil.Process] | None = None  # its processes, once it was told to stop
    kill_at: float = 0.0


def _stop(job: _Job) -> None:
    """SIGTERM the job's runner and every process under it (the ranks record "stopped"; a single-node
    runner does not pass the signal on to DeepSpeed's per-node launcher); `_pump` kills what is left
    after STOP_GRACE_S. A runner already reaped is skipped (its pid may be another process's now)."""
    if job.proc.poll() is not None:
        return
    try:
        runner = psutil.Process(job.proc.pid)
        job.stopping = [runner, *runner.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in job.stopping:
        with suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    job.kill_at = time.monotonic() + STOP_GRACE_S


def _kill(procs: list[psutil.Process]) -> None:
    for p in procs:
        with suppress(psutil.NoSuchProcess):
            p.kill()


def _pump(jobs: list[_Job]) -> None:
    """Feed each job's output to its console until its pipe closes, or until its runner has exited and the
    pipe stayed silent for a second since (a process a rank started may outlive it holding the pipe open).
    A job that fails stops the jobs of later stages: they read what it writes."""
    stopped = False
    while any(j.open for j in jobs):
        live = {j.proc.stdout.fileno(): j for j in jobs if j.open}
        for fd in select.select(list(live), [], [], 1.0)[0]:
            job = live[fd]
            if chunk := os.read(fd, 1 << 16):
                job.console.feed(chunk)
                job.last_data = time.monotonic()
            else:
                job.open, job.ended = False, time.monotonic()
        now = time.monotonic()
        for job in jobs:
            if job.open and job.proc.poll() is not None:
                job.exited = job.exited or now
                if now - max(job.exited, job.last_data) >= 1.0:
                    job.open, job.ended = False, now
            if job.stopping and now > job.kill_at:
                _kill(job.stopping)  # still there after the grace period
                job.stopping = None
        failed = [j for j in jobs if j.proc.poll()]
        if failed and not stopped:
            for job in jobs:
                if NAMES.index(job.stage) > NAMES.index(failed[0].stage):
                    _stop(job)
            stopped = True
    for job in jobs:
        if job.stopping:  # its output has ended, maybe not all of its processes: the rest of the grace
            _kill(psutil.wait_procs(job.stopping, timeout=max(0.0, job.kill_at - time.monotonic()))[1])
        job.proc.wait()
        job.console.feed(b"", final=True)


def run_stage(cfg: ExperimentConfig, stage: str, verbose: bool = False) -> float:
    """Run the stage's job to its end (its wall seconds); its output goes through a ConsoleFilter into logs/<stage>.log."""
    return run_stages(cfg, [stage], verbose)[stage]


def run_stages(cfg: ExperimentConfig, stages: list[str], verbose: bool = False) -> dict[str, float]:
    """Run the jobs of `stages` side by side to their ends (several: on disjoint slots, see placement.py),
    each one's output through its ConsoleFilter into logs/<stage>.log; their bars share the terminal's
    last line. Returns each stage's wall seconds. A failed job raises SystemExit naming its lost or failed
    rank and its log, after the jobs of later stages were stopped (the others run to their end)."""
    stale = stale_build_locks()
    if stale:
        raise SystemExit(
            f"stablekd: {stale[0]} is {STALE_BUILD_LOCK_S // 60}+ minutes old: a torch extension build was "
            f"killed while holding it, and the ranks of stage {stages[0]} would wait on it forever; if no build "
            "is running on this machine, delete it and rerun"
        )
    shared = SideBySide(sys.stderr, len(stages)) if len(stages) > 1 else None
    jobs: list[_Job] = []
    started, t0 = time.time(), time.monotonic()
    with ExitStack() as stack:
        try:
            for i, stage in enumerate(stages):
                # Unbuffered: lines reach the filter (and the terminal) as the ranks write them.
                env = dict(os.environ, **stage_env(cfg, stage), PYTHONUNBUFFERED="1")
                if cfg.launch.hostfile and i == 0:  # the same for every job: a runner may be reading it
                    write_deepspeed_env(cfg, env)
                if sys.stderr.isatty():  # tqdm sizes its bar from these when its stream is our pipe
                    cols, lines = shutil.get_terminal_size()
                    env.update(COLUMNS=str((cols - 3 * (len(stages) - 1)) // len(stages)), LINES=str(lines))
                cmd = runner_command(cfg, stage)
                log = log_path(cfg, stage)
                log.parent.mkdir(parents=True, exist_ok=True)
                f = stack.enter_context(open(log, "a", encoding="utf-8"))  # a resumed stage appends
                f.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {shlex.join(cmd)}\n")
                console = ConsoleFilter(f, shared.lane(i) if shared else sys.stderr, verbose)
                # One pipe for stdout and stderr keeps the order in which a rank wrote its lines and bars.
                proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                stack.callback(proc.stdout.close)
                jobs.append(_Job(stage, log, proc, console))
            _pump(jobs)
        except BaseException:  # Ctrl-C: as subprocess.run does, do not leave the runners behind
            for job in jobs:
                job.proc.kill()
                job.proc.wait()
            raise
    for job in jobs:
        if job.proc.returncode != 0:
            slots = placement.slots(cfg, job.stage) or placement.pool(cfg)  # where its ranks ran
            lost = ranks.lost(cfg.run_dir, job.stage, started, slots)
            why = lost or job.console.first_error
            raise SystemExit(
                f"stablekd: stage {job.stage} failed (exit {job.proc.returncode}){f': {why}' if why else ''}; "
                f"full output: {job.log}"
            )
    return {job.stage: job.ended - t0 for job in jobs}


@contextmanager
def diverted(stream: TextIO, python_warnings: bool = True) -> Iterator[None]:
    """Send this process's DeepSpeed log records (and Python warnings) to `stream`.

    DeepSpeed's logger prints through its own handler to stdout (e.g. "Setting accelerator to CPU" when it
    is first imported); a logger filter catches its records before any handler, whenever DeepSpeed is
    imported. Innermost wins: a stage's log inside the driver's.
    """
    logger = logging.getLogger("DeepSpeed")  # the object DeepSpeed configures on import
    fmt = logging.Formatter(
        "[%(asctime)s] [%(levelname)s] [%(filename)s:%(lineno)d:%(funcName)s] %(message)s"
    )

    def divert(record: logging.LogRecord) -> bool:
        stream.write(fmt.format(record) + "\n")
        stream.flush()
        return False  # handled: not printed

    logger.filters.insert(0, divert)  # before an outer diversion's filter (the first False stops)
    try:
        with warnings.catch_warnings():  # puts the original showwarning back
            if python_warnings:
                # warnings.showwarning's signature
                def show(message, category, filename, lineno, file=None, line=None) -> None:
                    stream.write(warnings.formatwarning(message, category, filename, lineno, line))
                    stream.flush()

                warnings.showwarning = show
            yield
    finally:
        logger.removeFilter(divert)


@contextmanager
def driver_log(cfg: ExperimentConfig, name: str, verbose: bool = False) -> Iterator[None]:
    """This process's DeepSpeed log records and Python warnings go to logs/<name>.log (`pipeline`: the
    driver's own; a stage's name: a stage that runs in this process). With `verbose`, they print as usual.
    Our own lines and bars are not touched."""
    if verbose:
        yield
        return
    log = log_path(cfg, name)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write(
            f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {name} in the launching process (pid {os.getpid()})\n"
        )
        with diverted(f):
            yield
