"""Shipped DeepSpeed JSONs resolve and pass DeepSpeed's config class; batch arithmetic; user values win."""

from __future__ import annotations

import json

import pytest

from stablekd.ds_configs.resolve import PACKAGE_DIR, fast_bf16, load, resolve, validate
from stablekd.launcher.config import ConfigError, TrainConfig
from stablekd.launcher.driver.cli import main
from tests.conftest import QUICKSTART

SHIPPED = sorted(p.name for p in PACKAGE_DIR.glob("*.json"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_resolves_and_validates_at_world_2(name, tmp_path):
    raw, path = load(name)
    ds = resolve(raw, TrainConfig(), 2, tmp_path / "tb", str(path))
    validate(ds, 2, str(path))
    assert ds["gradient_clipping"] == 1.0  # explicit: DeepSpeed's default changed in 0.19.3
    assert ds["bf16"]["enabled"] is fast_bf16()  # dtype "auto"
    assert ds["optimizer"]["params"]["lr"] == TrainConfig().lr
    assert ds["scheduler"]["params"]["total_num_steps"] == TrainConfig().max_steps
    assert "auto" not in json.dumps(ds)


@pytest.mark.parametrize(("micro", "accum", "world"), [(8, 1, 2), (4, 3, 2), (2, 2, 16), (1, 1, 1)])
def test_batch_arithmetic(micro, accum, world, tmp_path):
    raw, _ = load("zero3.json")
    ds = resolve(raw, TrainConfig(micro_batch_size=micro, grad_accum=accum), world, tmp_path)
    assert ds["train_batch_size"] == micro * accum * world
    assert ds["train_micro_batch_size_per_gpu"] == micro and ds["gradient_accumulation_steps"] == accum
    validate(ds, world)


def test_user_values_win_and_drive_the_arithmetic(tmp_path):
    raw, _ = load("zero2.json")
    raw["train_micro_batch_size_per_gpu"] = 3
    raw["gradient_clipping"] = 0.5
    raw["optimizer"]["params"]["lr"] = 1e-4
    ds = resolve(raw, TrainConfig(micro_batch_size=8, grad_accum=2, lr=3e-3, dtype="bf16"), 4, tmp_path)
    assert (ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"]) == (3, 3 * 2 * 4)
    assert ds["gradient_clipping"] == 0.5 and ds["optimizer"]["params"]["lr"] == 1e-4
    assert ds["bf16"]["enabled"] is True and raw["bf16"]["enabled"] == "auto"  # the input is not modified


def test_inconsistent_batch_size_is_refused(tmp_path):
    raw, _ = load("zero2.json")
    raw["train_batch_size"] = 7
    with pytest.raises(ConfigError, match=r"mine\.json: train_batch_size 7 != .* × world size 2 = 16"):
        resolve(raw, TrainConfig(), 2, tmp_path, "mine.json")


def test_unknown_auto_and_deepspeed_rejection_name_the_file(tmp_path):
    raw, _ = load("zero2.json")
    raw["zero_optimization"]["reduce_bucket_size"] = "auto"
    with pytest.raises(
        ConfigError, match=r"mine\.json: no value to fill .* zero_optimization\.reduce_bucket_size"
    ):
        resolve(raw, TrainConfig(), 2, tmp_path, "mine.json")
    raw, _ = load("zero2.json")
    raw["zero_optimization"]["stage"] = 7
    with pytest.raises(ConfigError, match=r"mine\.json: rejected by DeepSpeed"):
        validate(resolve(raw, TrainConfig(), 2, tmp_path), 2, "mine.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": "auto",,}')
    with pytest.raises(ConfigError, match=r"bad\.json: not valid JSON: line 1"):
        load(str(bad))


@pytest.mark.parametrize(
    ("section", "kind", "named"),
    [("optimizer", "NoSuchOpt", "adamw"), ("scheduler", "Cosine", "WarmupCosineLR")],
)
def test_dry_run_rejects_an_unknown_optimizer_or_scheduler_naming_the_file(
    section, kind, named, tmp_path, capsys
):
    raw, _ = load("zero2.json")
    raw[section]["type"] = kind
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps(raw))
    resolve(raw, TrainConfig(), 2, tmp_path)  # DeepSpeed's config class alone lets it through to the ranks
    with pytest.raises(SystemExit) as e:
        main(
            [
                "run",
                str(QUICKSTART),
                "--dry-run",
                f"run.out_dir={tmp_path / 'run'}",
                f"distill.ds_config={mine}",
            ]
        )
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(mine) in err[0] and f'{section}.type "{kind}"' in err[0] and named in err[0]
    raw[section]["type"] = {"optimizer": "SGD", "scheduler": "WarmupLR"}[
        section
    ]  # torch.optim and DeepSpeed's own
    validate(resolve(raw, TrainConfig(), 2, tmp_path), 2, "mine.json")


def test_cli_show_check_estimate(tmp_path, capsys):
    run = f"run.out_dir={tmp_path}/run"
    main(["ds-config", "show", str(QUICKSTART), run, "teacher.micro_batch_size=4", "launch.nproc_per_node=2"])
    shown = json.loads(capsys.readouterr().out)
    assert shown["train_batch_size"] == 8 and shown["zero_optimization"]["stage"] == 3
    main(["ds-config", "check", str(QUICKSTART), run, "teacher.ds_config=zero2.json"])
    assert "passes DeepSpeed's config check at world size 2" in capsys.readouterr().out
    main(
        ["ds-config", "estimate", str(QUICKSTART), run, "teacher.model=teacher-m", "launch.nproc_per_node=8"]
    )
    out = capsys.readouterr().out
    assert "teacher-m: 28" in out and "per CPU" in out and "per GPU" in out
    assert not (tmp_path / "run").exists()  # resolved in memory: nothing written anywhere


def test_cli_leaves_an_existing_runs_ds_json_alone(tmp_path, capsys):
    """A run's ds/teacher.json is what later stages load the ZeRO-3 teacher with: `ds-config` with another
    ds_config must not overwrite it; --out writes the resolved JSON where it is told, and only there."""
    run_dir = tmp_path / "run"
    run = f"run.out_dir={run_dir}"
    before = (run_dir / "ds" / "teacher.json", run_dir / "ds" / "distill.json")
    for path, text in zip(before, ('{"zero_optimization": {"stage": 3}}\n', "{}"), strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    snapshot = {p: p.read_bytes() for p in before}
    listing = sorted(run_dir.rglob("*"))
    for action in ("show", "check", "estimate"):
        main(
            ["ds-config", action, str(QUICKSTART), run, "teacher.ds_config=zero2.json", "teacher.model=tiny"]
        )
        main(
            ["ds-config", action, str(QUICKSTART), run, "--stage", "distill", "distill.ds_config=zero1.json"]
        )
    capsys.readouterr()
    assert {p: p.read_bytes() for p in before} == snapshot
    assert sorted(run_dir.rglob("*")) == listing

    out = tmp_path / "elsewhere" / "teacher_zero2.json"
    main(["ds-config", "show", str(QUICKSTART), run, "teacher.ds_config=zero2.json", "--out", str(out)])
    shown = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == shown and shown["zero_optimization"]["stage"] == 2
    assert {p: p.read_bytes() for p in before} == snapshot
