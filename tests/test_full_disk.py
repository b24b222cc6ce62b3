"""Full disks (launcher/driver/diskspace.py): a stage that cannot fit is refused before any rank starts, naming
both numbers and the path; a disk that fills while a stage writes ends it in one line naming the path and
the errno, leaves nothing half-written taken as complete, and the same command finishes once there is room.
Each test mounts a small tmpfs (needs root; skipped where mount is not permitted)."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import pytest

from stablekd.data_pipeline.shards.manifest import finalize
from stablekd.data_pipeline.shards.reader import ShardReader
from stablekd.data_pipeline.shards.writer import ShardWriter
from stablekd.launcher import diskfull
from stablekd.launcher.config import load_config
from stablekd.launcher.driver import cli, diskspace
from tests.conftest import QUICKSTART, REPO, TINY, run_stablekd, stablekd_cmd


@contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root needed): {proc.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(path: Path) -> Path:
    """Write zeros into `path` until its filesystem is full; returns the file (delete it to free the space)."""
    filler = path / "filler.bin"
    with suppress(OSError), open(filler, "wb", buffering=0) as f:
        while True:
            f.write(b"\0" * 65536)
    with suppress(OSError), open(filler, "ab", buffering=0) as f:  # the last partial block
        while True:
            f.write(b"\0" * 512)
    return filler


def test_stage_that_cannot_fit_is_refused_before_any_rank(tmp_path, capsys):
    run = tmp_path / "run"
    args = [f"run.out_dir={run}", *TINY, "launch.nproc_per_node=2", "teacher.max_steps=4"]
    with tmpfs(run / "teacher", "256k"):
        with pytest.raises(SystemExit) as e:
            cli.main(["stage", "teacher", str(QUICKSTART), *args])
        assert e.value.code == 2
        cfg = load_config(QUICKSTART, args)
        estimate, how = diskspace.checkpoint_bytes(cfg, "teacher")
        free = diskfull.free_bytes(run / "teacher")
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("stablekd: error")]
    assert line == (
        f"stablekd: error: [teacher] needs about {estimate / 1e6:.1f} MB more in {run / 'teacher'} (estimate: "
        f"{how}), but its filesystem has {free / 1e6:.1f} MB free: free space or use a run.out_dir on a larger "
        "filesystem"
    )
    assert re.fullmatch(r"0\.\d+M parameters × 16 bytes × 3 checkpoint tags", how)  # keep_checkpoints 2, + 1
    assert estimate > free and free <= 256 * 1024
    assert not (run / "logs" / "teacher.log").exists()  # no job was started


def test_shards_on_a_full_disk_commit_nothing_half_written_and_resume(tmp_path):
    out = tmp_path / "soft_labels"
    rows = np.arange(64 * 1024, dtype=np.int64).reshape(64, 1024)  # 8 KiB a record, 16 KiB a shard
    with tmpfs(out, "96k"):
        with pytest.raises(OSError) as e, ShardWriter(out, 0, "toy", {"v": 1}, records_per_shard=2) as w:
            for row in rows:
                w.add(x=row[None])
        assert e.value.errno == errno.ENOSPC and Path(e.value.filename).parent == out
        assert not list(out.glob("*.tmp"))  # the temp file of the shard that did not fit is gone
        manifest = json.loads((out / "manifest.r000.json").read_text())
        assert manifest["final"] is False and not (out / "manifest.json").exists()
        committed = sum(s["records"] for s in manifest["shards"])
        assert 0 < committed < len(rows)
        subprocess.run(["mount", "-o", "remount,size=2m", "tmpfs", str(out)], check=True)  # room again
        with ShardWriter(out, 0, "toy", {"v": 1}, records_per_shard=2) as w:
            assert w.records_written == committed  # every listed shard is whole (else: ShardError here)
            for row in rows[committed:]:
                w.add(x=row[None])
        finalize(out, 1)
        got = np.stack([r["x"].numpy() for r in ShardReader(out, "toy")])  # each shard's sha256 checked
    assert np.array_equal(got, rows)


@pytest.mark.distributed
def test_disk_filling_while_the_teacher_checkpoints_ends_in_one_line_and_resumes(tmp_path):
    run = tmp_path / "run"
    args = ["stage", "teacher", str(QUICKSTART), f"run.out_dir={run}", *TINY, "launch.nproc_per_node=2",
            "teacher.max_steps=12", "teacher.save_every=2", "teacher.dtype=fp32"]  # fmt: skip
    # The whole run directory on the small disk, the launching process's logs and rank status files too.
    with tmpfs(run, "24m"):
        proc = subprocess.Popen(
            stablekd_cmd(*args), cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"),
        )  # fmt: skip
        marker = run / "teacher" / "ckpt" / "complete.json"
        deadline = time.time() + 300
        while not (marker.exists() and json.loads(marker.read_text())["step"] >= 2):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        filler = fill(run)  # another process takes the rest of the disk
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, err[-3000:]
        lines = err.splitlines()
        assert "Traceback" not in err and sum("no space left on device" in x for x in lines) == 1, err
        m = re.fullmatch(
            r"stablekd: \[teacher\] failed: no space left on device writing (\S+) \(errno 28\); free space "
            r"and rerun the same command to resume",
            lines[-1],
        )
        assert m and Path(m[1]).is_relative_to(run), lines[-1]
        # Nothing half-written is taken as complete: the marker names a whole earlier tag, no DONE.json.
        kept = json.loads(marker.read_text())
        assert kept["step"] < 12 and (run / "teacher" / "ckpt" / kept["tag"]).is_dir()
        assert not (run / "teacher" / "DONE.json").exists()

        filler.unlink()
        rerun = run_stablekd(*args)
        assert f"resuming from step {kept['step']}" in rerun.stderr
        assert json.loads((run / "teacher" / "DONE.json").read_text())["produced"]["steps"] == 12
