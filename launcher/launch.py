"""Build and run the `deepspeed` runner command for a stage: one node, a hostfile, or one node of many.

Thin on purpose (gpt-neox's deepy.py): we resolve config and hand off to DeepSpeed's own runner, as an
argument list (never a shell string). The ranks run `python -m stablekd.launcher.worker <stage> <run_dir>`.

Console: the runner's and the ranks' stdout and stderr come through one pipe. Every line goes to
`<run_dir>/logs/<stage>.log`; the terminal gets only our own lines (`stablekd: ...`, `[<stage>] ...`) and
rank 0's tqdm bar, unless `verbose`, which shows everything.
"""

from __future__ import annotations

import codecs
import logging
import os
import re
import select
import shlex
import shutil
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import torch

from stablekd.launcher import nodes, ranks
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
    port = launch.master_port or (_free_port() if not launch.hostfile else nodes.DEFAULT_MASTER_PORT)
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


def stage_env(cfg: ExperimentConfig) -> dict[str, str]:
    """The environment variables a stage's job gets on top of ours (written nowhere: see run_stage)."""
    env = {"OMP_NUM_THREADS": str(threads_per_rank(cfg))}
    if cfg.launch.hostfile:
        env["DS_ENV_FILE"] = str(deepspeed_env_path(cfg))
    return env


def display_command(cfg: ExperimentConfig, stage: str) -> str:
    """The stage's job as one shell line (`--dry-run`): its environment, then the runner's argument list."""
    return shlex.join([f"{k}={v}" for k, v in stage_env(cfg).items()] + runner_command(cfg, stage))


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
    path.write_text("".join(f"{k}={v}\n" for k, v in sorted(keep.items())))
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


def _pump(proc: subprocess.Popen, console: ConsoleFilter) -> None:
    """Feed the job's output to `console` until the pipe closes, or until the runner has exited and the
    pipe stayed silent for a second: a process a rank started may outlive it holding the pipe open."""
    fd = proc.stdout.fileno()
    while True:
        if select.select([fd], [], [], 1.0)[0]:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            console.feed(chunk)
        elif proc.poll() is not None:
            break
    console.feed(b"", final=True)


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


def run_stage(cfg: ExperimentConfig, stage: str, verbose: bool = False) -> None:
    """Run the stage's job to its end; its output goes through a ConsoleFilter into logs/<stage>.log."""
    stale = stale_build_locks()
    if stale:
        raise SystemExit(
            f"stablekd: {stale[0]} is {STALE_BUILD_LOCK_S // 60}+ minutes old: a torch extension build was "
            f"killed while holding it, and the ranks of stage {stage} would wait on it forever; if no build is "
            "running on this machine, delete it and rerun"
        )
    # Unbuffered: lines reach the filter (and the terminal) as the ranks write them.
    env = dict(os.environ, **stage_env(cfg), PYTHONUNBUFFERED="1")
    if cfg.launch.hostfile:
        write_deepspeed_env(cfg, env)
    if sys.stderr.isatty():  # tqdm sizes its bar from these when its stream is our pipe
        cols, lines = shutil.get_terminal_size()
        env.update(COLUMNS=str(cols), LINES=str(lines))
    cmd = runner_command(cfg, stage)
    started = time.time()
    log = log_path(cfg, stage)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:  # a resumed stage appends: the log keeps every attempt
        f.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {shlex.join(cmd)}\n")
        console = ConsoleFilter(f, sys.stderr, verbose)
        # One pipe for stdout and stderr keeps the order in which a rank wrote its lines and bar updates.
        with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
            try:
                _pump(proc, console)
            except BaseException:  # Ctrl-C: as subprocess.run does, do not leave the runner behind
                proc.kill()
                raise
        if proc.returncode != 0:
            lost = ranks.lost(cfg.run_dir, stage, started, nodes.host_names(cfg), cfg.launch.nproc_per_node)
            why = f": {lost or console.first_error}" if lost or console.first_error else ""
            raise SystemExit(
                f"stablekd: stage {stage} failed (exit {proc.returncode}){why}; full output: {log}"
            )


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
