"""Running jobs: start a job's command (launch.py: DeepSpeed's per-node launcher or its runner) in its own
process group, pump its output through the console filter, and stop a job's whole process tree when it or
its partner fails (a single-node runner does not forward SIGTERM); a stale torch extension build lock fails
a stage before any rank would wait on it.
"""

from __future__ import annotations

import errno
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil

from stablekd.launcher import diskfull, placement, rank_status
from stablekd.launcher.config import ExperimentConfig
from stablekd.launcher.driver import launch
from stablekd.launcher.driver.console import ConsoleFilter, LogFile, SideBySide
from stablekd.launcher.stages import NAMES

# A torch extension build (DeepSpeed's cpu_adam for ZeRO offload, its fused Adam on GPU) holds its lock file
# for a few minutes at most; one older than this was left by a build killed mid-way.
STALE_BUILD_LOCK_S = 600


def stale_build_locks() -> list[Path]:
    """This machine's torch extension build locks older than STALE_BUILD_LOCK_S.

    torch's FileBaton has every process that loads an extension wait while the lock file exists, with no
    timeout and no owner to check: a process killed while holding it makes every later rank wait forever.
    """
    # torch.utils.cpp_extension.get_default_build_root() on Linux (user_cache_dir/torch_extensions),
    # without importing torch: ~1.6 s of every launch
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.realpath(Path(cache) / "torch_extensions"))
    stale = []
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:  # <root>[/py311_cpu]/<extension>/lock
        try:
            if time.time() - lock.stat().st_mtime > STALE_BUILD_LOCK_S:
                stale.append(lock)
        except FileNotFoundError:  # released since the glob: a build that just finished
            pass
    return sorted(stale)


# After SIGTERM a rank has this long to record "stopped" and exit (DeepSpeed's launcher itself waits 30 s
# for its ranks) before the job's processes are killed: a rank blocked in a collective never returns.
STOP_GRACE_S = 40.0
# A job one of whose ranks recorded a failure is stopped with this much grace (see _pump).
FAILED_RANK_GRACE_S = 5.0


@dataclass
class _Job:
    stage: str
    log: Path
    proc: subprocess.Popen
    console: ConsoleFilter
    run_dir: Path  # where its ranks record how they ended (launcher/rank_status.py)
    started: float  # time.time() of its launch
    last_data: float = 0.0  # time.monotonic() of its last output
    exited: float = 0.0  # when its launcher was first seen exited
    open: bool = True
    ended: float = 0.0  # when its output ended
    stopping: list[psutil.Process] | None = None  # its processes, once it was told to stop
    kill_at: float = 0.0
    ranks: int = 0  # the ranks its launcher starts on this node (0: a job spread over nodes)
    finished: bool = False  # every rank recorded "done" and exited: its launcher was ended early

    @property
    def returncode(self) -> int | None:
        """Its launcher's exit status (None while it runs); 0 for one ended early once its ranks finished."""
        return 0 if self.finished else self.proc.poll()


def _stop(job: _Job, grace: float | None = None) -> None:
    """SIGTERM the job's launcher and every process under it (the ranks record "stopped"; a single-node
    runner would not pass the signal on to DeepSpeed's per-node launcher); `_pump` kills what is left after
    `grace` seconds (None: STOP_GRACE_S). A launcher already reaped is skipped (its pid may be another
    process's now)."""
    if job.proc.poll() is not None:
        return
    try:
        top = psutil.Process(job.proc.pid)
        job.stopping = [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in job.stopping:
        with suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    job.kill_at = time.monotonic() + (STOP_GRACE_S if grace is None else grace)


def _end_if_finished(job: _Job, states: list[str]) -> None:
    """End the per-node launcher of a job whose ranks have all recorded "done" (`states`) and exited.
    DeepSpeed's launcher polls its ranks once a second and sleeps another second after the last has exited:
    ~1.5 s of every stage's wall time (a tenth of a tiny one's) spent waiting on a job with nothing left to do."""
    if not job.ranks or states.count("done") < job.ranks:
        return
    try:
        ranks = psutil.Process(job.proc.pid).children()
        if any(r.status() != psutil.STATUS_ZOMBIE for r in ranks):
            return  # recorded its end, still exiting
    except psutil.NoSuchProcess:
        return
    job.proc.kill()  # all it had left: reap its ranks (init does now) and log their exit at info level
    job.finished = True


def _kill(procs: list[psutil.Process]) -> None:
    for p in procs:
        with suppress(psutil.NoSuchProcess):
            p.kill()


def _pump(jobs: list[_Job]) -> None:
    """Feed each job's output to its console until its pipe closes, or until its launcher has exited and the
    pipe stayed silent for a second since (a process a rank started may outlive it holding the pipe open).
    A job that fails stops the jobs of later stages: they read what it writes."""
    stopped = False
    while any(j.open for j in jobs):
        live = {j.proc.stdout.fileno(): j for j in jobs if j.open}
        # A single-node job is checked for its end ten times a second (_end_if_finished), others once.
        wait = 0.1 if any(j.ranks for j in live.values()) else 1.0
        for fd in select.select(list(live), [], [], wait)[0]:
            job = live[fd]
            if chunk := os.read(fd, 1 << 16):
                job.console.feed(chunk)
                job.last_data = time.monotonic()
            else:
                job.open, job.ended = False, time.monotonic()
        now = time.monotonic()
        for job in jobs:
            # how its ranks ended so far, read once: while its launcher runs and nobody stops it
            running = job.stopping is None and job.proc.poll() is None
            states = rank_status.states(job.run_dir, job.stage, job.started) if running else []
            _end_if_finished(job, states)
            if job.open and job.proc.poll() is not None:
                job.exited = job.exited or now
                if now - max(job.exited, job.last_data) >= 1.0:
                    job.open, job.ended = False, now
            if job.open and job.stopping is None and any(s.startswith("failed") for s in states):
                # A rank failed: the job cannot succeed. DeepSpeed's launcher would give a silent (hung)
                # rank 30 s after SIGTERM; the others have recorded how they ended well before 5 s.
                _stop(job, FAILED_RANK_GRACE_S)
            if job.stopping and now > job.kill_at:
                _kill(job.stopping)  # still there after the grace period
                job.stopping = None
        failed = [j for j in jobs if j.returncode]
        if failed and not stopped:
            for job in jobs:
                if NAMES.index(job.stage) > NAMES.index(failed[0].stage):
                    _stop(job)
            stopped = True
    for job in jobs:
        if job.stopping:  # its output has ended, maybe not all of its processes: the rest of the grace
            # The launcher through Popen: psutil would reap it first, and Popen then reads exit status 0.
            try:
                job.proc.wait(timeout=max(0.0, job.kill_at - time.monotonic()))
            except subprocess.TimeoutExpired:
                job.proc.kill()
            rest = [p for p in job.stopping if p.pid != job.proc.pid]
            _kill(psutil.wait_procs(rest, timeout=max(0.0, job.kill_at - time.monotonic()))[1])
        job.proc.wait()
        job.console.feed(b"", final=True)


def _full(e: OSError | None) -> bool:
    return e is not None and e.errno == errno.ENOSPC


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
                env = dict(os.environ, **launch.stage_env(cfg, stage), PYTHONUNBUFFERED="1")
                if cfg.launch.hostfile and i == 0:  # the same for every job: a runner may be reading it
                    launch.write_deepspeed_env(cfg, env)
                if sys.stderr.isatty():  # tqdm sizes its bar from these when its stream is our pipe
                    cols, lines = shutil.get_terminal_size()
                    env.update(COLUMNS=str((cols - 3 * (len(stages) - 1)) // len(stages)), LINES=str(lines))
                cmd = launch.job_command(cfg, stage)
                log = launch.log_path(cfg, stage)
                log.parent.mkdir(parents=True, exist_ok=True)
                f = stack.enter_context(LogFile(log))  # a resumed stage appends
                f.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {shlex.join(cmd)}\n")
                console = ConsoleFilter(f, shared.lane(i) if shared else sys.stderr, verbose)
                # One pipe for stdout and stderr keeps the order in which a rank wrote its lines and bars.
                proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                stack.callback(proc.stdout.close)
                # A single-node job's ranks are all this launcher's: it can be ended once they finished.
                slots = placement.slots(cfg, stage) or placement.pool(cfg)
                ranks = 0 if cfg.launch.hostfile else sum(map(len, slots.values()))
                jobs.append(_Job(stage, log, proc, console, cfg.run_dir, started, ranks=ranks))
            _pump(jobs)
        except BaseException:  # Ctrl-C: as subprocess.run does, do not leave the launchers behind
            for job in jobs:
                job.proc.kill()
                job.proc.wait()
            raise
    for job in jobs:
        if job.returncode != 0:
            job.console.end_bar()  # the failure's line below the bar, not appended to it
        if job.returncode != 0 and job.console.disk_full:  # a rank's own line names the file
            raise SystemExit(job.console.disk_full)
        if job.returncode != 0 and _full(job.console.log.error):  # this process's log could not be written
            raise SystemExit(diskfull.full_line(job.stage, job.log))
        if job.returncode != 0:
            slots = placement.slots(cfg, job.stage) or placement.pool(cfg)  # where its ranks ran
            lost = rank_status.lost(cfg.run_dir, job.stage, started, slots)
            why = lost or job.console.first_error
            # the log first: `why` may end with the command that repairs what the stage refused
            raise SystemExit(
                f"stablekd: stage {job.stage} failed (exit {job.returncode}; full output: {job.log})"
                + (f": {why}" if why else "")
            )
    return {job.stage: job.ended - t0 for job in jobs}
