"""A full disk during a stage, told the same way on a rank and in the launching process: whether an error
means the disk is full (`disk_full`) and the one line the user sees (`full_line`). The launching process's
estimate before a stage starts is launcher/driver/diskspace.py's."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

# A stage that fails while its filesystem has less than this left failed for want of space, whatever its
# error says: libraries hide the errno (torch.save under DeepSpeed's save_checkpoint raised "basic_ios::clear:
# iostream error", then "unexpected pos 128 vs 0"; safetensors says "StorageFull").
NEARLY_FULL = 1 << 20


def free_bytes(path: Path) -> int:
    """Free space (for this user) of the filesystem `path` is or will be on (its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def full_line(stage: str, path: Path | str) -> str:
    """What the user sees when a disk fills during a stage (one line, rank or launcher alike)."""
    return (
        f"stablekd: [{stage}] failed: no space left on device writing {path} (errno {errno.ENOSPC}); "
        "free space and rerun the same command to resume"
    )


def _chain(e: BaseException | None):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def disk_full(e: BaseException, where: Path) -> Path | str | None:
    """The path a write failed on for want of space when `e` means a full disk, else None: an OSError
    ENOSPC in its chain (its file, else `where`), or any error while `where`'s filesystem is (nearly)
    full (see NEARLY_FULL)."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno == errno.ENOSPC:
            return x.filename or where
    return where if free_bytes(where) < NEARLY_FULL else None
