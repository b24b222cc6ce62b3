"""What of a job's output reaches the terminal. DeepSpeed's launcher's and the ranks' stdout and stderr come through
one pipe per job; every line goes to `<run_dir>/logs/<stage>.log`, the terminal gets only our own lines
(`stablekd: ...`, `[<stage>] ...`) and rank 0's tqdm bar (the bars of jobs side by side share one line),
unless `verbose`, which shows everything. In-process stages write through `driver_log` likewise.
"""

from __future__ import annotations

import codecs
import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TextIO

from stablekd.launcher.config import ExperimentConfig
from stablekd.launcher.driver.launch import log_path
from stablekd.launcher.stages import NAMES

# tqdm redraws its bar by writing "\r" + bar, e.g. "teacher:  42%|####   | 42/100 [00:10<00:14, 4.1it/s,
# loss=2.345]" (without a total: "teacher: 42it [00:10, 4.1it/s]"), padded with spaces to its last length.
_BAR = re.compile(r"[^\r\n]*?(?:\d+%\|[^|\r\n]*\|[^\[\r\n]*|\d+(?:\.\d+)?[kMGT]?it )\[[^\]\r\n]*\] *")


# Our own lines: the driver's `stablekd: ...` and a stage's `[<stage>] ...` (pdsh puts `host: ` first).
_OURS = re.compile(rf"(?:[\w.-]+: )?(?:stablekd:|\[(?:{'|'.join(NAMES)})\])")


# A rank's line for a full disk (launcher/diskfull.py full_line): every rank that hits it may print one; the terminal
# gets the first, once, as the job's failure (supervise.py).
_DISK_FULL = re.compile(r"(?:[\w.-]+: )?(stablekd: \[\w+\] failed: no space left on device .*? to resume)")


class LogFile:
    """A log the launching process appends to that never raises: a disk that fills while a stage runs
    must end the stage in one line (supervise.py), not in a traceback of this process's own log writes
    (buffered writes fail on flush and again on close). After the first failed write it drops what comes;
    `error` keeps that OSError."""

    def __init__(self, path: Path) -> None:
        self.path, self.error = path, None
        self._f: TextIO | None = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def _fail(self, e: OSError) -> None:
        self.error = self.error or e
        f, self._f = self._f, None
        with suppress(OSError):
            f.close()

    def write(self, text: str) -> None:
        if self._f is not None:
            try:
                self._f.write(text)
            except OSError as e:
                self._fail(e)

    def flush(self) -> None:
        if self._f is not None:
            try:
                self._f.flush()
            except OSError as e:
                self._fail(e)

    def close(self) -> None:
        self.flush()
        if self._f is not None:
            self._f.close()

    def __enter__(self) -> LogFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# The last line of a Python traceback, e.g. "stablekd.launcher.config.ConfigError: distill: ...".
_ERROR = re.compile(r"(?:\[rank\d+\]:\s*)?[A-Za-z_][\w.]*(?:Error|Exception): \S")


class ConsoleFilter:
    """Splits a job's output into lines and tqdm bar updates: every line goes to `log`; `term` gets our
    own lines and the bar, or everything with `verbose`. Keeps the first exception line it sees (the rank
    that failed first; the others usually fail after it, on a closed connection)."""

    def __init__(self, log: TextIO, term: TextIO, verbose: bool = False) -> None:
        self.log, self.term, self.verbose = log, term, verbose
        self.first_error: str | None = None
        self.disk_full: str | None = None  # the first rank's line about a full disk
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

    def end_bar(self) -> None:
        """Leave the bar's line (a line printed next starts at column 0 below the bar's last state)."""
        if self._on_bar:
            self._show("\n")
            self.term.flush()
            self._on_bar = False

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
        if m := _DISK_FULL.match(text):
            self.disk_full = self.disk_full or m[1]
            return
        if self.first_error is None and _ERROR.match(text):
            self.first_error = text.strip()
        if _OURS.match(text):
            if self._on_bar:  # start the line at column 0, keeping a bar that was not blanked
                self._show("\r" if self._cleared else "\n")
                self._on_bar = False
            self._show(text + "\n")


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
    with LogFile(log) as f:
        f.write(
            f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {name} in the launching process (pid {os.getpid()})\n"
        )
        with diverted(f):
            yield
