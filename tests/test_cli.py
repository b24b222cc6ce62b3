"""The CLI around the pipeline: --stages, --dry-run, the console filter, `stablekd status`, the report table."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest

from stablekd.launcher import done, placement, rundir
from stablekd.launcher.config import ConfigError, load_config, save_config
from stablekd.launcher.driver import cli, console, launch, pipeline, prepare, supervise
from stablekd.launcher.driver.status import format_status, headline, report_table, run_status
from stablekd.launcher.rank.monitor import read_scalars
from stablekd.launcher.stages import NAMES
from tests.conftest import QUICKSTART, REPO, UPSTREAM, copy_run, run_stablekd


def test_stages_subset_keeps_pipeline_order(capsys):
    assert cli.select_stages("evaluate, teacher") == ["teacher", "evaluate"]
    assert cli.select_stages(None) == ["teacher", "soft_labels", "distill", "contrastive", "evaluate"]
    with pytest.raises(
        ConfigError, match=r"unknown stage\(s\) 'techer', 'eval' \(stages: teacher, soft_labels"
    ):
        cli.select_stages("techer,distill,eval")
    with pytest.raises(SystemExit) as e:
        cli.main(["run", str(QUICKSTART), "--stages", "distill,nope"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "stablekd: error: --stages: unknown stage(s) 'nope' (stages: teacher, soft_labels, distill, contrastive, evaluate)"
    ]


def test_dry_run_prints_commands_and_skips_and_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    common = [f"run.out_dir={run}", "launch.nproc_per_node=2", "launch.master_port=29555"]
    cfg = load_config(QUICKSTART, common)
    # A teacher finished with exactly this config (its DeepSpeed JSON included): the dry run skips it.
    marker = rundir.done_path(cfg, "teacher")
    marker.parent.mkdir(parents=True)
    ds = placement.resolve_ds_config(cfg, "teacher")
    marker.write_text(json.dumps({"config_hash": done.stage_hash(cfg, "teacher", ds)}))
    before = sorted(tmp_path.rglob("*"))
    capsys.readouterr()  # DeepSpeed's import-time line, printed by the resolve above (not the dry run)

    # key=value overrides may follow the options
    cli.main(["run", str(QUICKSTART), "--stages", "distill,soft_labels,teacher", "--dry-run", *common])
    out = capsys.readouterr().out.splitlines()
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, not even config.yaml or logs/
    assert f"# teacher: done already ({marker}), would be skipped" in out
    prepared = next(line for line in out if line.startswith("# prepare"))
    assert "config.yaml" in prepared and "ds/distill.json" in prepared and "ds/teacher.json" in prepared
    commands = [shlex.split(line) for line in out if not line.startswith("#")]
    assert [c[-2] for c in commands] == ["soft_labels", "distill"]  # pipeline order, teacher skipped
    for c in commands:
        assert re.fullmatch(r"OMP_NUM_THREADS=\d+", c[0])
        assert c[1:5] == [sys.executable, "-u", "-m", "deepspeed.launcher.launch"]
        assert "--world_info=eyJsb2NhbGhvc3QiOiBbMCwgMV19" in c  # base64 of {"localhost": [0, 1]}
        assert "--master_port=29555" in c
        assert c[-5:] == [
            "--no_local_rank",
            "--log_level=warning",
            "stablekd.launcher.rank.worker",
            c[-2],
            str(run),
        ]

    cli.main(["stage", "teacher", str(QUICKSTART), *common, "--dry-run"])
    assert f"# teacher: done already ({marker}), would be skipped" in capsys.readouterr().out
    assert sorted(tmp_path.rglob("*")) == before


# What a rank writes: DeepSpeed's log line, a Python warning, rank 0's tqdm bar with a tqdm.write line in
# the middle, another rank's stray line right after a bar update, our own line, and a traceback.
CHILD = r"""
import sys, time, warnings
from tqdm import tqdm
print("[2026-01-01 10:00:00,000] [WARNING] [real_accelerator.py:1:get_accelerator] Setting accelerator to CPU.",
      file=sys.stderr)
warnings.warn("a deprecated collective", FutureWarning)
bar = tqdm(total=4, desc="teacher", dynamic_ncols=True)
for i in range(4):
    time.sleep(0.05)
    bar.update(1)
    bar.set_postfix({"loss": f"{3 - i:.3f}"}, refresh=False)
    if i == 1:
        tqdm.write("[teacher] step 2: train loss 2.0000, eval loss 2.5000")
        print("another rank's warning", file=sys.stderr)
bar.close()
print("stablekd: evaluate: one line of ours", file=sys.stderr)
raise ValueError("boom")
"""


def _filtered(verbose: bool) -> tuple[str, str, str | None]:
    log, term = io.StringIO(), io.StringIO()
    feed = console.ConsoleFilter(log, term, verbose)
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    while chunk := os.read(proc.stdout.fileno(), 7):  # small reads: lines and bars arrive in pieces
        feed.feed(chunk)
    feed.feed(b"", final=True)
    assert proc.wait() == 1
    return term.getvalue(), log.getvalue(), feed.first_error


def test_console_shows_our_lines_and_the_bar_and_logs_everything():
    term, log, error = _filtered(verbose=False)
    shown = [s for s in re.split(r"[\r\n]", term) if s.strip()]
    assert "[teacher] step 2: train loss 2.0000, eval loss 2.5000" in shown
    assert "stablekd: evaluate: one line of ours" in shown
    assert any(re.fullmatch(r"teacher: 100%\|\S+\| 4/4 \[.*loss=0\.000\] *", s) for s in shown)  # last bar
    for other in ("Setting accelerator", "FutureWarning", "another rank's warning", "Traceback", "boom"):
        assert other not in term
    # our line starts at column 0: tqdm blanked its bar ("\r" + spaces + "\r") before writing it
    assert "\r[teacher] step 2" in term and term.endswith(
        "loss=0.000]\nstablekd: evaluate: one line of ours\n"
    )

    lines = log.splitlines()
    for want in ("Setting accelerator to CPU.", "FutureWarning: a deprecated collective", "another rank's warning",
                 "[teacher] step 2", "stablekd: evaluate: one line of ours", "Traceback", "ValueError: boom"):  # fmt: skip
        assert any(want in line for line in lines), want
    bars = [line for line in lines if "%|" in line]
    assert len(bars) == 1 and "4/4" in bars[0]  # the bar's last state only, not every redraw
    assert "" not in lines
    assert error == "ValueError: boom"

    verbose_term, verbose_log, _ = _filtered(verbose=True)
    assert "Setting accelerator" in verbose_term and "Traceback" in verbose_term
    assert verbose_log.splitlines()[:3] == lines[:3]


def test_failed_job_prints_its_error_and_log(tmp_path, monkeypatch, capsys):
    cfg = load_config(QUICKSTART, [f"run.out_dir={tmp_path}"])
    monkeypatch.setattr(launch, "job_command", lambda cfg, stage: [sys.executable, "-c", CHILD])
    with pytest.raises(SystemExit) as e:
        supervise.run_stage(cfg, "teacher")
    log = tmp_path / "logs" / "teacher.log"
    assert str(e.value) == f"stablekd: stage teacher failed (exit 1; full output: {log}): ValueError: boom"
    err = capsys.readouterr().err
    assert "stablekd: evaluate: one line of ours" in err and "Traceback" not in err
    assert log.read_text().startswith("=== ") and "Traceback" in log.read_text()


# A launcher told to stop after a rank recorded its failure: its output ends, then it takes a while to exit.
SLOW_TO_EXIT = """
import os, signal, sys, time
from pathlib import Path
from stablekd.launcher.rank_status import RankStatus
RankStatus(Path(sys.argv[1]), "teacher", 0).end("failed: RuntimeError: boom")
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # still stopping its ranks
print("RuntimeError: boom", flush=True)
os.close(1), os.close(2)
time.sleep(1.5)
os._exit(1)
"""


def test_a_stopped_launcher_that_exits_after_its_output_ends_still_fails_the_stage(tmp_path, monkeypatch):
    """Its exit status is read by its Popen, not reaped by the wait for its process tree (which would leave
    Popen an exit status of 0: a failed stage taken for one that ended without a word)."""
    cfg = load_config(QUICKSTART, [f"run.out_dir={tmp_path}"])
    monkeypatch.setattr(
        launch, "job_command", lambda cfg, stage: [sys.executable, "-c", SLOW_TO_EXIT, str(tmp_path)]
    )
    with pytest.raises(SystemExit, match=r"^stablekd: stage teacher failed \(exit 1; .*RuntimeError: boom"):
        supervise.run_stage(cfg, "teacher")


# A launcher that, like DeepSpeed's, reaps its ranks only when it polls (here: after SLEEP seconds), then
# exits 3. Its ranks record the given ends and exit at once. Arguments: run dir, SLEEP, one state per rank.
LATE_POLLER = """
import subprocess, sys, time
rank = ("import os, sys; from stablekd.launcher.rank_status import RankStatus; "
        "s = RankStatus(sys.argv[1], 'teacher', int(sys.argv[2])); sys.argv[3] != 'running' and s.end(sys.argv[3]); "
        "os._exit(0)")
ranks = [subprocess.Popen([sys.executable, "-c", rank, sys.argv[1], str(r), state]) for r, state in enumerate(sys.argv[3:])]
time.sleep(float(sys.argv[2]))
sys.exit(3)
"""


@pytest.mark.parametrize(("states", "ends"), [(["done", "done"], "early"), (["done", "running"], "failed")])
def test_a_job_whose_ranks_all_finished_ends_without_waiting_for_its_launcher(
    tmp_path, monkeypatch, states, ends
):
    """Every rank recorded "done" and exited: the job has succeeded, and its launcher (which would poll for
    30 s more, then exit 3) is ended at once. One rank that ended without a word: the launcher's exit
    status stands, and the job fails naming that rank."""
    cfg = load_config(QUICKSTART, [f"run.out_dir={tmp_path}", "launch.nproc_per_node=2"])
    sleep = "30" if ends == "early" else "2"
    command = [sys.executable, "-c", LATE_POLLER, str(tmp_path), sleep, *states]
    monkeypatch.setattr(launch, "job_command", lambda cfg, stage: command)
    t0 = time.monotonic()
    if ends == "early":
        supervise.run_stage(cfg, "teacher")
        assert time.monotonic() - t0 < 15
    else:
        with pytest.raises(SystemExit, match=r"failed \(exit 3; .*lost rank 1 \(pid"):
            supervise.run_stage(cfg, "teacher")


def test_job_whose_child_outlives_it_does_not_hang(tmp_path, monkeypatch, capsys):
    # A rank's child that keeps the pipe open (here `sleep`, holding stdout) must not keep us waiting.
    child = "import subprocess; subprocess.Popen(['sleep', '20']); print('[teacher] finished')"
    monkeypatch.setattr(launch, "job_command", lambda cfg, stage: [sys.executable, "-c", child])
    t0 = time.monotonic()
    supervise.run_stage(load_config(QUICKSTART, [f"run.out_dir={tmp_path}"]), "teacher")
    assert time.monotonic() - t0 < 15
    assert capsys.readouterr().err == "[teacher] finished\n"


def test_report_table_aligns_the_main_table(tmp_path, monkeypatch, capsys):
    (tmp_path / "eval").mkdir()
    models = {
        "teacher": {"ppl": 3.0, "bios_accuracy": 0.95, "params": 4.2e6},
        "student": {"ppl": 4.25, "bios_accuracy": 0.5, "params": 1.1e6},
        "contrastive": {"ppl": 4.5, "params": 1.1e6},
    }
    sizes = {"ppl": "1984 held-out tokens", "bios_accuracy": "60 questions"}
    missing = {"rep_4": "96 generated tokens < 256 (raise evaluate.prefixes)"}
    report = {"models": models, "ratios": {}, "notes": [], "sizes": sizes, "missing": missing}
    (tmp_path / "eval" / "report.json").write_text(json.dumps(report))
    rows = report_table(tmp_path).splitlines()
    assert [c.strip() for c in rows[0].strip("|").split("|")] == [
        "metric",
        "teacher",
        "student",
        "contrastive",
        "computed on",
        "note",
    ]
    assert set(rows[1]) <= set("|-: ")
    assert len({len(r) for r in rows}) == 1  # aligned
    cells = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:7]] for r in rows[2:]}
    assert cells["perplexity, held-out text (`ppl`)"] == [
        "3.000",
        "4.250",
        "4.500",
        sizes["ppl"],
        "lower is better; only between models of one tokenizer",
    ]
    assert cells["bios accuracy (greedy) (`bios_accuracy`)"][:4] == ["0.950", "0.500", "–", "60 questions"]
    assert cells["parameters (`params`)"][:3] == ["4.20M", "1.10M", "1.10M"]
    # A figure computed on too little text is a row of dashes that says why.
    assert cells["rep-4 (%) (`rep_4`)"] == ["–", "–", "–", "", f"missing: {missing['rep_4']}"]
    assert report_table(tmp_path / "nothing") is None
    finished = {"produced": {"report_json": "eval/report.json", "models": list(models)}}
    assert headline("evaluate", finished, tmp_path / "eval") == "bios accuracy teacher 0.950, student 0.500"

    # What `run` prints once the stages are through (the stages themselves are not what is tested here).
    monkeypatch.setattr(pipeline, "run", lambda cfg, stages, verbose: None)
    cli.main(["run", str(QUICKSTART), f"run.out_dir={tmp_path}", "--stages", "evaluate"])
    out = capsys.readouterr().out.splitlines()
    assert out == [
        *rows,
        "",
        f"report: {tmp_path / 'eval' / 'report.md'}",
        f"tensorboard --logdir {tmp_path / 'tb'}",
    ]


@pytest.mark.distributed
def test_status_of_a_half_finished_run_then_resume_quietly(upstream, tmp_path):
    run = copy_run(upstream, tmp_path / "run")
    finished = json.loads((run / "teacher" / "DONE.json").read_text())
    (run / "teacher" / "DONE.json").unlink()  # killed after its last checkpoint, before DONE.json
    labelled = json.loads((run / "soft_labels" / "DONE.json").read_text())
    (run / "soft_labels" / "DONE.json").unlink()  # killed after every shard, before DONE.json
    mass = labelled["produced"]["soft_labels"]["fidelity"]["topk_mass"]
    assert headline("soft_labels", labelled, run / "soft_labels") == (
        f"7 sequences in 7 shards, kept mass {mass:.3f}; 6 candidate groups of 3"
    )  # max_sequences=7, records_per_shard=1; 6 contexts x (2 samples + the gold one)

    by = {s.name: s for s in run_status(run)}
    assert [s.name for s in run_status(run)] == NAMES
    teacher = by["teacher"]
    assert (teacher.state, teacher.step, teacher.tag, teacher.world_size, teacher.ranks) == (
        "resumable", 6, "step0000006", 2, [0, 1]
    )  # fmt: skip
    assert teacher.detail.startswith("at step 6 of 6 (") and "files from ranks 0,1 of 2)" in teacher.detail
    losses = read_scalars(run / "tb" / "teacher", "train/loss")  # the event files, read without TB's loader
    assert teacher.scalars["train/loss"] == (6, pytest.approx(losses[6]))
    assert teacher.scalars["perf/tokens_per_s"][0] == 6
    labels = by["soft_labels"]
    assert labels.state == "resumable"
    assert "soft_labels/: 7 records from ranks 0,1 (2 final)" in labels.detail  # soft_labels.max_sequences=7
    assert "soft_labels/candidates/: 6 records from ranks 0,1" in labels.detail  # candidate_contexts=6
    assert [by[s].state for s in ("distill", "contrastive", "evaluate")] == ["not started"] * 3

    shown = run_stablekd("status", str(run)).stdout
    assert re.search(r"^  teacher +resumable +at step 6 of 6 ", shown, re.M)
    assert re.search(r"^  distill +not started$", shown, re.M)
    assert re.search(
        r"^ +tb step 6: train/loss \d\.\d{4}, eval/loss \d\.\d{4}, perf/tokens_per_s ", shown, re.M
    )

    # One rank's shard gone from the tag complete.json names: status says whose files are missing.
    for f in (run / "teacher" / "ckpt" / "step0000006").glob("*rank*1*"):
        if re.search(r"zero_pp_rank_1_|stablekd_rank00001", f.name):
            f.rename(tmp_path / f.name)
    assert "files from rank 0 of 2, NONE from 1" in format_status(run, run_status(run))
    for f in tmp_path.glob("*rank*"):
        f.rename(run / "teacher" / "ckpt" / "step0000006" / f.name)

    # Resume the teacher for real (at max_steps: it only evaluates and writes DONE.json): the terminal
    # gets our lines only, the log everything the launcher and ranks printed.
    out = run_stablekd("stage", "teacher", str(QUICKSTART), f"run.out_dir={run}", *UPSTREAM)
    err = out.stderr.splitlines()
    assert "stablekd: [teacher] started, resuming from step 6" in err
    ended = [line for line in err if line.startswith("stablekd: [teacher] done in ")]
    assert len(ended) == 1 and "6 steps" in ended[0] and ended[0].endswith(f"-> {run / 'teacher'}")
    assert (
        f"eval loss {finished['produced']['eval_loss']:.4f}" in ended[0]
    )  # the same weights, evaluated again
    assert "[WARNING]" not in out.stderr + out.stdout and "Traceback" not in out.stderr
    attempts = (run / "logs" / "teacher.log").read_text().split("\n=== ")  # the upstream run's, then this one
    this = attempts[-1]
    assert len(attempts) == 2 and this.splitlines()[0].endswith(
        f"--log_level=warning stablekd.launcher.rank.worker teacher {run}"
    )
    assert "[WARNING] [real_accelerator.py" in this  # DeepSpeed's lines went to the log ...
    assert "[teacher] resumed from" in this and "[teacher] resumed from" in out.stderr  # ... ours to both
    assert out.stdout.splitlines()[-1] == f"tensorboard --logdir {run / 'tb'}"
    assert {s.name: s.state for s in run_status(run)}["teacher"] == "done"


def test_bad_corpus_input_is_refused_before_anything_starts(tmp_path, capsys):
    """A .jsonl in another schema stops `run --dry-run` (and `run`: the same check_files) in one line; a
    data.eval_fraction beside data.eval_paths, and a data.paths override that would inherit a config
    file's held-out files, are ConfigErrors naming both keys."""
    answers = tmp_path / "answers.jsonl"
    answers.write_text(
        "".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(40))
    )
    prose = tmp_path / "prose.txt"
    prose.write_text("In the beginning God created the heaven and the earth.\n")
    base = ["run", str(QUICKSTART), "--dry-run", f"run.out_dir={tmp_path / 'run'}"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main([*base, f"data.paths=[{prose}, {answers}]"])
    assert e.value.code == 2 and not (tmp_path / "run").exists()
    assert capsys.readouterr().err.splitlines() == [
        f'stablekd: error: data.paths: {answers}: no usable record in 40 (first: line 1: keys "question", '
        '"answer"); expected each record to have "text", "prompt" + "response" (a non-blank response) or '
        '"messages" (role/content pairs, one a non-blank assistant message)'
    ]
    with pytest.raises(ConfigError, match=f"data.eval_paths: {answers}: no usable record"):
        prepare.check_files(
            load_config(QUICKSTART, [f"data.paths=[{prose}]", f"data.eval_paths=[{answers}]"])
        )

    # data.eval_fraction beside data.eval_paths would be ignored: refused, on the command line or in a file.
    both = [f"data.paths=[{prose}]", f"data.eval_paths=[{prose}]", "data.eval_fraction=0.1"]
    with pytest.raises(ConfigError, match=r"data\.eval_fraction: 0\.1 given with data\.eval_paths"):
        load_config(QUICKSTART, both)
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"data:\n  paths: [{prose}]\n  eval_paths: [{prose}]\n  eval_fraction: 0\n")
    with pytest.raises(
        ConfigError, match=r"exp\.yaml: data\.eval_fraction: 0\.0 given with data\.eval_paths"
    ):
        load_config(exp)
    assert load_config(QUICKSTART, both[:2]).data.eval_fraction == 0.02  # the default: nothing was given

    # configs/corpus.yaml's held-out files are Genesis questions: another data.paths must name its own.
    corpus = REPO / "configs" / "corpus.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(corpus, [f"data.paths=[{prose}]"])
    assert "data.paths overridden, but data.eval_paths still names" in str(e.value)
    assert "tests/data/genesis_facts/heldout.jsonl" in str(e.value) and "'data.eval_paths=[]'" in str(e.value)
    with pytest.raises(ConfigError, match="data.paths overridden"):
        load_config(corpus, [f"data.paths=[{prose}]", "data.eval_fraction=0.1"])
    own = load_config(corpus, [f"data.paths=[{prose}]", f"data.eval_paths=[{prose}]"])
    share = load_config(corpus, [f"data.paths=[{prose}]", "data.eval_paths=[]", "data.eval_fraction=0.1"])
    assert (own.data.eval_paths, share.data.eval_paths, share.data.eval_fraction) == ([str(prose)], [], 0.1)
    genesis = load_config(corpus, [f"run.out_dir={tmp_path / 'g'}"])  # the shipped corpus, as shipped
    assert genesis.data.eval_paths and genesis.data.paths[0].startswith("tests/data/genesis_facts/")
    # The ranks reload config.yaml (every key written, nothing overridden): still accepted.
    save_config(share, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml").data == share.data


def test_quickstart_command_finds_its_shipped_config(tmp_path):
    """`stablekd quickstart`, the README's first command, through the installed console script: it reads
    the packaged configs/quickstart.yaml (a path computed from the module's own place broke when the CLI
    moved into launcher/driver/)."""
    from stablekd.launcher.driver.cli import QUICKSTART as shipped

    assert shipped.is_file() and shipped.read_bytes() == QUICKSTART.read_bytes()
    exe = os.path.join(os.path.dirname(sys.executable), "stablekd")
    out = subprocess.run(
        [exe, "quickstart", "--dry-run", f"run.out_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "teacher" in out.stdout and not (tmp_path / "run").exists()
