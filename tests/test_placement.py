"""distill beside soft_labels on disjoint slots (launcher/placement.py): the slots each job gets, the
runner commands that name them, the shared terminal line, and a real `stablekd run` that starts the
student's job while the sharded teacher still writes its soft labels."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from stablekd.launcher import placement
from stablekd.launcher.config import ConfigError, load_config
from stablekd.launcher.driver import launch, supervise
from stablekd.launcher.driver.console import SideBySide
from stablekd.launcher.driver.launch import job_command, runner_command
from stablekd.launcher.driver.pipeline import _groups, dry_run
from stablekd.launcher.rank.monitor import read_scalars
from tests import early_launch
from tests.conftest import (
    QUICKSTART,
    REPO,
    UPSTREAM,
    copy_run,
    kill_after_checkpoint,
    run_stablekd,
    stablekd_cmd,
)


def _cfg(tmp_path: Path, *extra: str):
    return load_config(QUICKSTART, [f"run.out_dir={tmp_path}", *extra])


def test_distill_include_splits_the_pool(tmp_path):
    follow = ["launch.nproc_per_node=4", "distill.follow=true"]
    cfg = _cfg(tmp_path, *follow, "distill.include=localhost:2,3")
    assert placement.pool(cfg) == {"localhost": [0, 1, 2, 3]}
    assert placement.slots(cfg, "distill") == {"localhost": [2, 3]}
    assert placement.slots(cfg, "soft_labels") == {"localhost": [0, 1]}
    assert placement.slots(cfg, "teacher") is None and placement.world_size(cfg, "teacher") == 4
    assert [placement.world_size(cfg, s) for s in ("soft_labels", "distill")] == [2, 2]
    assert _groups(cfg, ["teacher", "soft_labels", "distill", "evaluate"]) == [
        ["teacher"], ["soft_labels", "distill"], ["evaluate"]
    ]  # fmt: skip
    # Without follow distill only runs on its slots, after soft_labels has run on all of them.
    alone = _cfg(tmp_path, "launch.nproc_per_node=4", "distill.include=localhost:3")
    assert placement.slots(alone, "soft_labels") is None and placement.world_size(alone, "distill") == 1
    assert _groups(alone, ["soft_labels", "distill"]) == [["soft_labels"], ["distill"]]

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=8\nnode-b slots=2\nnode-c slots=2\n")
    nodes = [f"launch.hostfile={hostfile}", "launch.master_addr=10.0.0.1", "launch.master_port=29600"]
    multi = _cfg(tmp_path, *follow, *nodes, "distill.include=node-c:1@node-b")  # in any order ...
    assert list(placement.slots(multi, "distill").items()) == [
        ("node-b", [0, 1]),
        ("node-c", [1]),
    ]  # hostfile's
    assert placement.slots(multi, "soft_labels") == {"node-a": [0, 1, 2, 3], "node-c": [0]}
    labels, student = runner_command(multi, "soft_labels"), runner_command(multi, "distill")
    assert labels[labels.index("--include") + 1] == "node-a:0,1,2,3@node-c:0"
    assert student[student.index("--include") + 1] == "node-b:0,1@node-c:1"
    for cmd in (labels, student):  # the runner refuses --num_gpus beside --include
        assert "--num_accelerators" not in cmd and "--num_gpus" not in cmd
    # Each job's rendezvous on its own first node; distill's port apart from soft_labels' (+1: handshake).
    assert labels[labels.index("--master_addr") + 1] == "10.0.0.1"
    assert student[student.index("--master_addr") + 1] == "node-b"
    assert int(student[student.index("--master_port") + 1]) == 29602

    for bad, why in [
        ("distill.include=node-z", "host 'node-z' is not in the run's pool"),
        ("distill.include=localhost:4", "slot(s) [4] of localhost outside its slots [0, 1, 2, 3]"),
        ("distill.include=localhost:a", "expected `host` or `host:slot,slot`"),
        ("distill.include=localhost", "takes every slot of the pool"),
    ]:
        with pytest.raises(ConfigError, match="^distill\\.include: .*" + re.escape(why)):
            placement.check(_cfg(tmp_path, *follow, bad))
    with pytest.raises(ConfigError, match="not with launch.no_ssh"):
        placement.check(_cfg(tmp_path, *follow, *nodes, "launch.no_ssh=true", "launch.node_rank=0",
                             "distill.include=node-b"))  # fmt: skip


def test_single_node_jobs_name_their_slots_and_the_dry_run_says_so(tmp_path, capsys):
    cfg = _cfg(tmp_path, "launch.nproc_per_node=2", "distill.follow=true", "distill.include=localhost:1")
    cmd = job_command(cfg, "distill")  # the per-node launcher on slot 1 of this node
    assert (
        cmd[3] == "deepspeed.launcher.launch" and "--world_info=eyJsb2NhbGhvc3QiOiBbMV19" in cmd
    )  # {"localhost": [1]}
    labels = job_command(cfg, "soft_labels")
    assert "--world_info=eyJsb2NhbGhvc3QiOiBbMF19" in labels  # {"localhost": [0]}
    lines = dry_run(cfg, ["soft_labels", "distill"])
    assert "# soft_labels: would run on 1 ranks (localhost:0), beside distill (distill.follow)" in lines
    assert "# distill: would run on 1 ranks (localhost:1), beside soft_labels (distill.follow)" in lines


def test_side_by_side_bars_share_one_line(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the terminal's width, which the shared line never exceeds
    term = io.StringIO()
    shared = SideBySide(term, 2)
    labels, student = shared.lane(0), shared.lane(1)
    bar = "soft_labels:  50%|#####     | 2/4 [00:01<00:01, 2.0it/s]"
    labels.write("\r" + bar)
    student.write("\rdistill:  10%|#         | 1/10 [00:01<00:09, 1.0it/s]")
    assert term.getvalue().rsplit("\r", 1)[-1] == (
        "soft_labels:  50%|#####     | 2/4 [00:01<00:01, 2.0it/s] │ distill:  10%|#         | 1/10 [00:01<00:09, 1.0it/s]"
    )
    # "\n" after a bar leaves it printed (as on a terminal of its own); a line of ours prints above the bars
    student.write("\n[distill] step 1: kd 1.2\n")
    labels.write("\r" + " " * 20 + "\r")  # tqdm blanking its bar
    out = term.getvalue()
    assert "1/10 [00:01<00:09, 1.0it/s]\n" in out and "\r[distill] step 1: kd 1.2\n" in out
    assert out.endswith("\r" + bar + "\r" + " " * len(bar) + "\r")  # what was left: soft_labels' bar, blanked
    assert shared.bars == ["", ""]
    monkeypatch.setenv("COLUMNS", "40")
    later = "distill:  20%|##        | 2/10 [00:02<00:08, 1.0it/s]"
    student.write("\r" + later)
    assert term.getvalue().rsplit("\r", 1)[-1] == later[:39]


BESIDE = [
    "distill.follow=true", "distill.include=localhost:1", "distill.max_steps=12", "distill.temperature=2.0",
    "student.model=tiny-student", "distill.micro_batch_size=2", "distill.save_every=4", "distill.eval_every=0",
    "distill.export_hf=false", "distill.log_every=1",
]  # fmt: skip


def _beside(upstream: Path, run: Path) -> list[str]:
    """The 2-rank teacher's run without its soft labels, and the command that runs the two stages."""
    copy_run(upstream, run)
    for path in (run / "soft_labels", run / "logs" / "ranks"):
        shutil.rmtree(path)
    return [
        "run",
        str(QUICKSTART),
        f"run.out_dir={run}",
        *UPSTREAM,
        *BESIDE,
        "--stages",
        "soft_labels,distill",
    ]


@early_launch.fixture("upstream")
def beside(tmp_path_factory, upstream: Path) -> tuple[Path, str]:
    """The two stages run side by side, uninterrupted: the run and the command's stderr."""
    run = tmp_path_factory.mktemp("beside") / "run"
    args = _beside(upstream, run)
    (run / "teacher" / "ckpt" / ".universal.partial" / "step0000006_universal").mkdir(
        parents=True
    )  # a killed one
    return run, run_stablekd(*args).stderr


@pytest.mark.distributed
def test_run_starts_distill_beside_the_soft_labels_writer(upstream, beside, tmp_path):
    """`stablekd run` converts the 2-rank teacher checkpoint for the 1-rank soft_labels job and starts it
    beside a 1-rank distill job that follows its shards; killed (both jobs) and rerun, it resumes both and
    the student's curve is the uninterrupted one."""
    run, err = beside
    assert "[soft_labels] started on localhost:0" in err and "[distill] started on localhost:1" in err
    tag = json.loads((run / "teacher" / "ckpt" / "complete.json").read_text())["tag"]
    assert (run / "teacher" / "ckpt" / f"{tag}_universal" / "zero").is_dir()  # shards of 2 ranks, job of 1
    assert not (run / "teacher" / "ckpt" / ".universal.partial").exists()

    status = {
        p.name.split(".")[0]: json.loads(p.read_text()) for p in (run / "logs" / "ranks").glob("*.json")
    }
    assert sorted(p.name for p in (run / "logs" / "ranks").glob("*.json")) == [
        "distill.r00000.json", "soft_labels.r00000.json"
    ]  # fmt: skip
    assert status["soft_labels"]["state"] == status["distill"]["state"] == "done"
    # Side by side: the student's rank started before the writer's rank had finished.
    assert status["distill"]["started"] < status["soft_labels"]["at"]
    assert status["soft_labels"]["started"] < status["distill"]["at"]

    manifest = json.loads((run / "soft_labels" / "manifest.json").read_text())
    assert manifest["writer_world_size"] == 1 and manifest["total_records"] == 7
    student = json.loads((run / "student" / "DONE.json").read_text())["produced"]
    assert student["world_size"] == 1 and student["steps"] == 12
    assert "[soft_labels] done in" in err and "[distill] done in" in err

    killed = tmp_path / "killed"
    args = _beside(upstream, killed)
    proc = subprocess.Popen(
        stablekd_cmd(*args),
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    step = kill_after_checkpoint(proc, killed / "student", 4)
    err = run_stablekd(*args).stderr
    assert f"[distill] started on localhost:1, resuming from step {step}" in err
    full = read_scalars(run / "tb" / "distill", "train/loss")
    after = read_scalars(killed / "tb" / "distill", "train/loss")
    assert [after[s] for s in range(step + 1, 13)] == pytest.approx(
        [full[s] for s in range(step + 1, 13)], rel=1e-5
    )
    assert json.loads((killed / "soft_labels" / "manifest.json").read_text())["total_records"] == 7


def test_a_failed_writer_stops_its_reader_and_a_failed_reader_lets_the_writer_finish(tmp_path, monkeypatch):
    """run_stages with stand-in jobs (the launcher's process tree is what is stopped): soft_labels failing
    stops distill at once; distill failing leaves soft_labels to finish its shards."""
    cfg = _cfg(tmp_path)
    # The reader stands in for a launcher whose ranks are its children: one child records its pid and sleeps,
    # deaf to SIGTERM (a rank stuck in a collective): it is killed once the grace period is over.
    grandchild = (
        "import os, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "open(sys.argv[1] + '.child', 'w').write(str(os.getpid())); time.sleep(60)"
    )
    monkeypatch.setattr(supervise, "STOP_GRACE_S", 1.0)
    jobs = {
        # fails once the reader's child runs (the stop must reach it)
        "fails": f"import os, sys, time; [time.sleep(0.1) for _ in range(100) if not os.path.exists({str(tmp_path / 'distill.child')!r})]; "
        "print('RuntimeError: teacher shard unreadable'); sys.exit(1)",
        "writes": "import sys, time; time.sleep(2); open(sys.argv[1], 'w').write('done')",
        "reads": f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {grandchild!r}, sys.argv[1]]); "
        "time.sleep(60)",
    }
    plan: dict[str, str] = {}
    monkeypatch.setattr(
        launch,
        "job_command",
        lambda cfg, stage: [sys.executable, "-c", jobs[plan[stage]], str(tmp_path / stage)],
    )

    plan.update(soft_labels="fails", distill="reads")
    t0 = time.monotonic()
    with pytest.raises(
        SystemExit,
        match=r"stage soft_labels failed \(exit 1; full output: \S+\): RuntimeError: teacher shard unreadable",
    ):
        supervise.run_stages(cfg, ["soft_labels", "distill"])
    assert time.monotonic() - t0 < 20  # not the reader's 60 s
    child = int((tmp_path / "distill.child").read_text())
    deadline = time.monotonic() + 10
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the reader's child outlived the stop"
        time.sleep(0.1)

    plan.update(soft_labels="writes", distill="fails")
    with pytest.raises(SystemExit, match=r"stage distill failed \(exit 1; full output: \S+\)"):
        supervise.run_stages(cfg, ["soft_labels", "distill"])
    assert (tmp_path / "soft_labels").read_text() == "done"
