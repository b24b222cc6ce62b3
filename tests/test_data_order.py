"""A stage resumed on other data, or reading it in another order, is refused before any rank starts
(launcher/driver/data_order.py); one that has not started or has finished is not."""

from __future__ import annotations

import json
import os
import time

import pytest

from stablekd.launcher import rundir
from stablekd.launcher.config import ConfigError, load_config
from stablekd.launcher.driver import data_order


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("First paragraph.\n\nSecond paragraph.\n")
    (d / "b.txt").write_text("Third paragraph.\n")
    return d


def _cfg(tmp_path, corpus, *overrides):
    return load_config(None, [f"run.out_dir={tmp_path / 'run'}", f"data.paths={corpus}", *overrides])


def _killed_after_a_checkpoint(cfg, stage="teacher"):
    ckpt = cfg.run_dir / stage / "ckpt"
    ckpt.mkdir(parents=True)
    (ckpt / "complete.json").write_text(json.dumps({"tag": "step0000004", "step": 4}))


def test_a_resume_on_changed_files_or_keys_is_refused_naming_them(tmp_path, corpus):
    cfg = _cfg(tmp_path, corpus)
    data_order.check(cfg, "teacher")  # first start: nothing recorded, nothing to resume
    data_order.record(cfg, "teacher")
    recorded = json.loads((cfg.run_dir / "teacher" / "data_order.json").read_text())
    assert recorded["data.num_workers"] == 0 and recorded["teacher.micro_batch_size"] == 8
    assert recorded[f"file {(corpus / 'a.txt').resolve()}"].startswith("sha256:")
    _killed_after_a_checkpoint(cfg)
    data_order.check(cfg, "teacher")  # the same inputs: resumes

    for overrides, named in (
        (["data.num_workers=2"], "data.num_workers: 0 then, 2 now"),
        (["teacher.micro_batch_size=4"], "teacher.micro_batch_size: 8 then, 4 now"),
        (["run.seed=7"], "run.seed: 0 then, 7 now"),
    ):
        with pytest.raises(ConfigError, match=named):
            data_order.check(_cfg(tmp_path, corpus, *overrides), "teacher")

    # One file's contents edited: named with both digests; a file added: named as absent then.
    before = recorded[f"file {(corpus / 'b.txt').resolve()}"]
    (corpus / "b.txt").write_text("Third paragraph, edited.\n")
    with pytest.raises(ConfigError) as e:
        data_order.check(cfg, "teacher")
    after = data_order.file_digest(corpus / "b.txt")
    assert f"b.txt: {before!r} then, {after!r} now" in str(e.value) and "a.txt" not in str(e.value)
    (corpus / "b.txt").write_text("Third paragraph.\n")
    (corpus / "c.txt").write_text("A new file.\n")
    with pytest.raises(ConfigError, match=r"c\.txt: '\(absent\)' then"):
        data_order.check(cfg, "teacher")
    (corpus / "c.txt").unlink()

    # Finished: DONE.json judges it, there is nothing to resume.
    (cfg.run_dir / "teacher" / "DONE.json").write_text("{}")
    data_order.check(_cfg(tmp_path, corpus, "data.num_workers=2"), "teacher")


def test_soft_labels_order_includes_the_candidate_keys_and_rank_manifests_count_as_progress(tmp_path, corpus):
    cfg = _cfg(tmp_path, corpus)
    data_order.record(cfg, "soft_labels")
    # Before any rank manifest there is nothing to resume: a change is simply recorded.
    changed = _cfg(tmp_path, corpus, "soft_labels.generate_batch_size=4")
    data_order.check(changed, "soft_labels")
    data_order.record(changed, "soft_labels")
    (cfg.run_dir / "soft_labels" / "candidates").mkdir(parents=True)
    (cfg.run_dir / "soft_labels" / "candidates" / "manifest.r001.json").write_text("{}")
    with pytest.raises(ConfigError, match="soft_labels.candidate_contexts: 256 then, 8 now"):
        data_order.check(_cfg(tmp_path, corpus, "soft_labels.generate_batch_size=4",
                              "soft_labels.candidate_contexts=8"), "soft_labels")  # fmt: skip
    with pytest.raises(ConfigError, match="soft_labels.candidate_tasks_only: False then, True now"):
        data_order.check(_cfg(tmp_path, corpus, "soft_labels.generate_batch_size=4",
                              "soft_labels.candidate_tasks_only=true"), "soft_labels")  # fmt: skip


def test_distill_order_includes_the_on_policy_ramp(tmp_path, corpus):
    """Which micro-batches are the student's own samples: a resume on another ramp is refused."""
    on_policy = ("distill.on_policy=0.5", "distill.on_policy_warmup_steps=4")
    cfg = _cfg(tmp_path, corpus, *on_policy)
    data_order.record(cfg, "distill")
    _killed_after_a_checkpoint(cfg, "student")
    data_order.check(cfg, "distill")
    with pytest.raises(ConfigError, match="distill.on_policy_warmup_steps: 4 then, 8 now"):
        data_order.check(_cfg(tmp_path, corpus, "distill.on_policy=0.5", "distill.on_policy_warmup_steps=8"),
                         "distill")  # fmt: skip


def test_a_key_added_to_the_order_later_reads_as_its_default_in_an_older_record(tmp_path, corpus):
    """A stage recorded before soft_labels.candidate_tasks_only was part of its order resumes with the
    default and is refused with the other value."""
    cfg = _cfg(tmp_path, corpus)
    data_order.record(cfg, "soft_labels")
    path = cfg.run_dir / "soft_labels" / "data_order.json"
    older = json.loads(path.read_text())
    del older["soft_labels.candidate_tasks_only"]
    path.write_text(json.dumps(older))
    (cfg.run_dir / "soft_labels" / "manifest.r000.json").write_text("{}")
    data_order.check(cfg, "soft_labels")
    with pytest.raises(ConfigError, match="soft_labels.candidate_tasks_only: False then, True now"):
        data_order.check(_cfg(tmp_path, corpus, "soft_labels.candidate_tasks_only=true"), "soft_labels")


def test_each_training_file_is_read_once_per_launch_unless_it_changes(tmp_path, corpus, monkeypatch):
    old = time.time() - 3600
    for f in corpus.iterdir():
        os.utime(f, (old, old))
    reads = []
    sha256 = data_order._sha256
    monkeypatch.setattr(data_order, "_sha256", lambda path: reads.append(path.name) or sha256(path))
    monkeypatch.setattr(data_order, "_DIGESTS", {})
    cfg = _cfg(tmp_path, corpus)
    for stage in ("teacher", "soft_labels", "distill", "contrastive"):  # what one `stablekd run` does
        data_order.check(cfg, stage)
        data_order.record(cfg, stage)
    assert sorted(reads) == ["a.txt", "b.txt"]
    (corpus / "b.txt").write_text("Third paragraph, edited.\n")  # just written: read every time
    data_order.record(cfg, "teacher")
    data_order.record(cfg, "distill")
    assert sorted(reads) == ["a.txt", "b.txt", "b.txt", "b.txt"]
    recorded = json.loads((rundir.stage_dir(cfg, "distill") / "data_order.json").read_text())
    assert recorded[f"file {(corpus / 'b.txt').resolve()}"] == sha256(corpus / "b.txt")
