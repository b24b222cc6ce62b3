"""What each stage reads: data.text_unit and the held-out share of a user corpus (rundir.train_files /
eval_files), the built-in bios corpus one biography per document, hashes of older run directories, and
no NaN where a stage has no held-out text."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from stablekd.data_pipeline import bios
from stablekd.data_pipeline.sources import iter_documents
from stablekd.launcher import done, rundir
from stablekd.launcher.config import ConfigError, load_config
from stablekd.launcher.driver import prepare
from stablekd.launcher.driver.status import headline

PARAGRAPHS = [f"Paragraph {i}, first line.\n  Its second line, number {i}." for i in range(400)]
DOCUMENTS = [p.replace("\n  ", " ") for p in PARAGRAPHS]  # a paragraph's lines join with one space


@pytest.fixture
def user_corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("\n\n".join(PARAGRAPHS[:250]) + "\n")
    (d / "b.txt").write_text("\n\n".join(PARAGRAPHS[250:]) + "\n")
    return d


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"run.out_dir={tmp_path / 'run'}", *overrides])


def test_user_corpus_holds_out_a_share_of_paragraphs_by_default(tmp_path, user_corpus):
    cfg = _cfg(tmp_path, f"data.paths={user_corpus}")
    train, held = rundir.train_files(cfg), rundir.eval_files(cfg)
    assert (train.text_unit, train.split, held.split) == ("paragraph", "train", "eval")
    assert list(train) == list(held) == [user_corpus / "a.txt", user_corpus / "b.txt"]
    train_docs, held_docs = list(iter_documents(train)), list(iter_documents(held))
    assert sorted(train_docs + held_docs) == sorted(DOCUMENTS)
    assert not set(train_docs) & set(held_docs)
    assert 1 <= len(held_docs) <= 20  # Binomial(400, 0.02): mean 8, sd 2.8

    # eval_fraction 0: everything trains and there is no held-out text (eval_files is empty, falsy).
    cfg = _cfg(tmp_path, f"data.paths={user_corpus}", "data.eval_fraction=0")
    assert not rundir.eval_files(cfg) and list(iter_documents(rundir.train_files(cfg))) == DOCUMENTS

    # eval_paths replace the share: every document of data.paths trains, every one of eval_paths scores.
    other = tmp_path / "held.txt"
    other.write_text("one held-out line\nanother\n")
    cfg = _cfg(tmp_path, f"data.paths={user_corpus}", f"data.eval_paths={other}", "data.text_unit=line")
    assert list(iter_documents(rundir.eval_files(cfg))) == ["one held-out line", "another"]
    assert len(list(iter_documents(rundir.train_files(cfg)))) == 2 * len(PARAGRAPHS)


def test_builtin_bios_corpus_is_one_biography_per_document_whatever_the_text_unit(tmp_path):
    corpus = bios.generate(6, 2, 1, 2, seed=0)
    for unit in ("paragraph", "file"):
        cfg = _cfg(tmp_path, f"data.text_unit={unit}")
        bios.write_corpus(corpus, cfg.run_dir / "data")
        assert list(iter_documents(rundir.train_files(cfg))) == corpus.train
        assert list(iter_documents(rundir.eval_files(cfg))) == corpus.heldout


def test_older_run_directories_keep_their_hashes(tmp_path, user_corpus):
    """text_unit and eval_fraction enter the stage hashes and tokenizer params only where they change what
    is read, so a bios run (or a user run read line by line with no share) still matches its DONE.json."""
    base = done.stage_hash(_cfg(tmp_path), "teacher")
    for extra in ("data.text_unit=file", "data.eval_fraction=0.5"):
        assert done.stage_hash(_cfg(tmp_path, extra), "teacher") == base
    assert done._data_hashed(_cfg(tmp_path)) == {}  # every data key at its default
    assert done._data_hashed(_cfg(tmp_path, "data.seq_len=64", "data.bios.people=9")) == {
        "seq_len": 64,
        "bios": {"people": 9},
    }
    assert set(prepare.tokenizer_params(_cfg(tmp_path))) == {"vocab_size", "files"}

    old = _cfg(tmp_path, f"data.paths={user_corpus}", "data.text_unit=line", "data.eval_fraction=0")
    assert "text_unit" not in done._data_hashed(old) and "eval_fraction" not in done._data_hashed(old)
    hashes = {
        done.stage_hash(_cfg(tmp_path, f"data.paths={user_corpus}", *o), "teacher")
        for o in [("data.text_unit=line", "data.eval_fraction=0"), (), ("data.eval_fraction=0.1",),
                  ("data.text_unit=file",)]
    }  # fmt: skip
    assert len(hashes) == 4  # each reading of the user's files is another training input


def test_a_key_added_with_its_default_keeps_hashes_so_a_run_in_progress_resumes(tmp_path):
    """An upgrade of stablekd that adds a config key with a default: the stage hash a checkpoint and a DONE.json
    carry stays the same (the resume check compares exactly these), unless the new key is set."""
    cfg = _cfg(tmp_path, "teacher.max_steps=7")
    before = done.stage_hash(cfg, "teacher")
    done.write_done(cfg, "teacher", {}, {})  # the teacher finished before the upgrade
    newer = dataclasses.make_dataclass(
        "TeacherConfig", [("new_knob", float, dataclasses.field(default=0.5))], bases=(type(cfg.teacher),)
    )
    cfg.teacher = newer(**dataclasses.asdict(cfg.teacher))
    assert done.stage_hash(cfg, "teacher") == before and done.is_done(cfg, "teacher")
    assert done.stage_hash(cfg, "soft_labels") == done.stage_hash(
        _cfg(tmp_path, "teacher.max_steps=7"), "soft_labels"
    )
    cfg.teacher.new_knob = 0.25  # set: another run
    assert done.stage_hash(cfg, "teacher") != before
    with pytest.raises(ConfigError, match="finished with another config"):
        done.is_done(cfg, "teacher")


def test_data_keys_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.text_unit: expected one of paragraph, line, file"):
        _cfg(tmp_path, "data.text_unit=sentence")
    with pytest.raises(ConfigError, match=r"data\.eval_fraction: expected a value in \[0, 1\)"):
        _cfg(tmp_path, "data.eval_fraction=1")
    assert _cfg(tmp_path, "data.eval_fraction=5e-2").data.eval_fraction == 0.05


def test_a_stage_without_held_out_text_shows_no_eval_loss():
    done = {"produced": {"eval_loss": None, "steps": 6, "tokens": 1536}}  # DONE.json: null, never NaN
    line = headline("teacher", done, Path("/nonexistent"))
    assert "eval loss" not in line and "nan" not in line.lower() and "6 steps" in line
