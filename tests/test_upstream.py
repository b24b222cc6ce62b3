"""A stage reads another's output only when that stage finished with its current config (issue #11 item 3).

Run directories are fabricated: DONE.json files written with `done.write_done` (the current hash) or
edited to another hash; a teacher/ckpt/complete.json without teacher/DONE.json is a teacher killed (or
still running) after its last checkpoint. `check_upstream` runs in the launching process before any rank.
"""

from __future__ import annotations

import json

import pytest

from stablekd.launcher import done, rundir
from stablekd.launcher.config import ConfigError, load_config
from stablekd.launcher.driver.cli import main
from stablekd.launcher.stages import REGISTRY
from tests.conftest import QUICKSTART, TINY


def _cfg(run, *extra):
    return load_config(QUICKSTART, [f"run.out_dir={run}", *extra])


def _done(cfg, stage, hash_=None):
    done.write_done(cfg, stage, {}, {})
    if hash_ is not None:
        path = rundir.done_path(cfg, stage)
        path.write_text(json.dumps({**json.loads(path.read_text()), "config_hash": hash_}))


def _killed_teacher(cfg):
    ckpt = rundir.ckpt_dir(cfg, "teacher")
    ckpt.mkdir(parents=True)
    (ckpt / "complete.json").write_text(json.dumps({"tag": "step0000006", "step": 6}))


def test_registry_names_only_earlier_stages():
    names = [s.name for s in REGISTRY]
    for i, s in enumerate(REGISTRY):
        assert set(s.needs) | set(s.uses) <= set(names[:i]), s.name


@pytest.mark.parametrize("stage", ["soft_labels", "evaluate"])
def test_teacher_with_checkpoint_but_no_done_is_refused(stage, tmp_path):
    cfg = _cfg(tmp_path / "run")
    _killed_teacher(cfg)
    with pytest.raises(ConfigError) as e:
        done.check_upstream(cfg, stage)
    msg = str(e.value)
    assert str(cfg.run_dir / "teacher" / "DONE.json") in msg and "missing" in msg
    assert msg.endswith(f"; run `stablekd stage teacher {cfg.run_dir / 'config.yaml'}` to finish it")
    _done(cfg, "teacher")
    done.check_upstream(cfg, stage)  # finished now: accepted


def test_done_with_another_hash_is_refused(tmp_path):
    cfg = _cfg(tmp_path / "run")
    _killed_teacher(cfg)
    _done(cfg, "teacher", hash_="0123456789abcdef")
    with pytest.raises(
        ConfigError, match=r"teacher/DONE.json has config hash 0123456789abcdef, but stage teacher"
    ):
        done.check_upstream(cfg, "soft_labels")
    _done(cfg, "teacher")  # the current hash
    done.check_upstream(cfg, "soft_labels")
    changed = _cfg(tmp_path / "run", "teacher.lr=1e-3")  # the teacher finished with another lr
    with pytest.raises(ConfigError, match=r"teacher/DONE.json has config hash .* would have"):
        done.check_upstream(changed, "soft_labels")


def test_distill_needs_soft_labels_or_for_online_the_teacher(tmp_path):
    cfg = _cfg(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"soft_labels/DONE.json missing.*stablekd stage soft_labels"):
        done.check_upstream(cfg, "distill")
    online = _cfg(tmp_path / "run", "distill.online=true")
    with pytest.raises(ConfigError, match=r"teacher/DONE.json missing"):
        done.check_upstream(online, "distill")
    _done(cfg, "teacher")
    done.check_upstream(online, "distill")  # online reads the teacher only
    with pytest.raises(ConfigError, match=r"soft_labels/DONE.json missing"):
        done.check_upstream(cfg, "distill")
    # follow mode reads a soft_labels stage still writing: no DONE.json yet is the point
    follow = _cfg(tmp_path / "run", "distill.follow=true")
    done.check_upstream(follow, "distill")
    # A follower's hash (on its checkpoints) does not change when the stage it follows finishes.
    while_writing = done.stage_hash(follow, "distill")
    _done(cfg, "soft_labels")
    assert done.stage_hash(follow, "distill") == while_writing
    _done(cfg, "soft_labels", hash_="stale")  # but a finished one must still match
    with pytest.raises(ConfigError, match=r"soft_labels/DONE.json has config hash stale"):
        done.check_upstream(follow, "distill")
    _done(cfg, "soft_labels")
    done.check_upstream(cfg, "distill")
    done.check_upstream(follow, "distill")


def test_contrastive_needs_distill_and_soft_labels(tmp_path):
    cfg = _cfg(tmp_path / "run")
    _done(cfg, "teacher")
    _done(cfg, "distill")
    with pytest.raises(ConfigError, match=r"soft_labels/DONE.json missing"):
        done.check_upstream(cfg, "contrastive")
    _done(cfg, "soft_labels")  # new upstream hash: distill's DONE.json (written before) is stale now
    with pytest.raises(ConfigError, match=r"student/DONE.json has config hash"):
        done.check_upstream(cfg, "contrastive")
    _done(cfg, "distill")
    done.check_upstream(cfg, "contrastive")
    rundir.done_path(cfg, "distill").unlink()
    with pytest.raises(ConfigError, match=r"student/DONE.json missing.*stablekd stage distill"):
        done.check_upstream(cfg, "contrastive")


def test_contrastive_from_a_student_of_its_own_needs_no_distill_stage(tmp_path):
    """contrastive.init_from: a student distilled elsewhere (benchmarks/real_text.py's arms) is started
    from; this run's soft labels (candidates, KD stream) still must be finished."""
    hf = tmp_path / "student_hf"
    cfg = _cfg(tmp_path / "run", f"contrastive.init_from={hf}")
    _done(cfg, "teacher")
    with pytest.raises(ConfigError, match=r"soft_labels/DONE.json missing"):
        done.check_upstream(cfg, "contrastive")
    _done(cfg, "soft_labels")
    done.check_upstream(cfg, "contrastive")  # no student/DONE.json, none needed
    assert rundir.contrastive_start(cfg) == hf
    assert rundir.contrastive_start(_cfg(tmp_path / "run")) == rundir.stage_dir(cfg, "distill") / "hf"


def test_evaluate_checks_each_model_present(tmp_path):
    cfg = _cfg(tmp_path / "run")
    _done(cfg, "teacher")
    done.check_upstream(cfg, "evaluate")  # no student yet: the report has the teacher only
    hf = rundir.stage_dir(cfg, "distill") / "hf"
    hf.mkdir(parents=True)  # exported, then killed before DONE.json
    with pytest.raises(ConfigError, match=r"evaluate: .*student/DONE.json missing"):
        done.check_upstream(cfg, "evaluate")
    _done(cfg, "distill")
    done.check_upstream(cfg, "evaluate")


def test_cli_stage_refuses_an_unfinished_teacher_in_one_line(tmp_path, capsys):
    """Through the driver: the error comes before any rank or preflight, one line, exit 2."""
    run = tmp_path / "run"
    _killed_teacher(_cfg(run))
    with pytest.raises(SystemExit) as e:
        main(["stage", "soft_labels", str(QUICKSTART), f"run.out_dir={run}", *TINY])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if "error" in line]) == 1
    assert err[-1].startswith("stablekd: error: soft_labels: ") and "teacher/DONE.json missing" in err[-1]
