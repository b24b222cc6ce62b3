"""What fixes the order and contents of the samples a stage reads, recorded so a resume cannot change it.

A killed stage resumes at a data position (a checkpoint's reader state, the records a soft-label rank
has committed) that only means something for the same inputs read the same way: the same training files
with the same contents, seed, sequence length, data workers and micro batch. Change one between the kill
and the rerun and samples are silently repeated or skipped. So the launching process records them in
<stage dir>/data_order.json each time a stage starts, and refuses to start a stage that has resumable
progress (a complete checkpoint, a soft-label rank manifest) and no DONE.json when any of them differ,
naming the key or file and both values. A stage that finished is judged by its DONE.json instead.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from stablekd.data_pipeline.files import atomic_write, read_marker
from stablekd.launcher import hints, rundir
from stablekd.launcher.config import ConfigError, ExperimentConfig
from stablekd.launcher.stages import spec

# Config keys that fix every stage's order, besides `<stage>.micro_batch_size` and the registry's `order`.
SHARED_KEYS = ("run.seed", "data.seq_len", "data.num_workers", "data.text_unit", "data.eval_fraction")
FILE = "data_order.json"


# (resolved path, size, mtime_ns) -> digest: one launch checks and records every training stage, and a
# multi-GB corpus should be read once per launch, not once per check and stage.
_DIGESTS: dict[tuple[str, int, int], str] = {}
# A file modified this recently may change again within the same mtime tick (timestamps are as coarse as
# the kernel's clock tick), keeping size and mtime: its digest is not cached (git's "racy" entries).
_RACY_S = 2.0


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return "sha256:" + h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    """sha256 of a file's contents (first 16 hex digits), read in 1 MiB blocks; read once per process
    while its size and mtime stay the same."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    digest = _sha256(path)
    if time.time() - st.st_mtime > _RACY_S:
        _DIGESTS[key] = digest
    return digest


def _value(cfg: ExperimentConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def data_order(cfg: ExperimentConfig, stage: str) -> dict[str, Any]:
    """{config key or "file <path>": value} of everything that fixes what `stage` reads next."""
    keys = (*SHARED_KEYS, f"{stage}.micro_batch_size", *spec(stage).order)
    order: dict[str, Any] = {key: _value(cfg, key) for key in keys}
    run_dir = cfg.run_dir.resolve()
    for path in map(Path, rundir.train_files(cfg)):
        # inside the run directory (the bios corpus) by relative path: a copied or moved run still resumes
        name = (
            path.resolve().relative_to(run_dir) if path.resolve().is_relative_to(run_dir) else path.resolve()
        )
        order[f"file {name}"] = file_digest(path)
    return order


def changes(then: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'key: A then, B now' for each key whose value differs (absent on one side counts)."""
    return [
        f"{key}: {then.get(key, '(absent)')!r} then, {now.get(key, '(absent)')!r} now"
        for key in sorted(then.keys() | now.keys())
        if then.get(key) != now.get(key)
    ]


def in_progress(cfg: ExperimentConfig, stage: str) -> bool:
    """The stage has progress a rerun resumes from and has not finished."""
    out = rundir.stage_dir(cfg, stage)
    if rundir.done_path(cfg, stage).exists():
        return False
    return read_marker(rundir.ckpt_dir(cfg, stage)) is not None or any(out.rglob("manifest.r*.json"))


def check(cfg: ExperimentConfig, stage: str) -> None:
    """Refuse to resume `stage` on other inputs, or read in another order, than it started with."""
    path = rundir.stage_dir(cfg, stage) / FILE
    if in_progress(cfg, stage) and path.exists():
        now = data_order(cfg, stage)
        # A key added to the order after the stage started (a newer stablekd) was read at its default then.
        default = ExperimentConfig()
        defaults = {k: _value(default, k) for k in now if not k.startswith("file ")}
        diff = changes({**defaults, **json.loads(path.read_text())}, now)
        if diff:
            raise ConfigError(
                f"{stage}: cannot resume {path.parent} on other data: {'; '.join(diff)}. These fix which "
                f"samples come next ({path}); restore them, use a new run.out_dir, or "
                f"{hints.redo(cfg, stage, hints.SAME_COMMAND)}"
            )


def record(cfg: ExperimentConfig, stage: str) -> None:
    """Write what `stage` starts on (after `check` let it start)."""
    path = rundir.stage_dir(cfg, stage) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data_order(cfg, stage), indent=2))
