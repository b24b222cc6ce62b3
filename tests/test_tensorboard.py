"""What a user sees in TensorBoard: the evaluate report as one chart per metric with a point per model,
its table and samples in the TEXT tab, and the CUSTOM SCALARS layout every training stage writes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from stablekd.evaluation import report
from stablekd.launcher.rank.monitor import Monitor

MODELS = {
    "teacher": {"ppl": 3.5, "bios_accuracy": 0.9, "params": 4.0e6},
    "student": {"ppl": 4.0, "bios_accuracy": 0.6, "params": 1.0e6},
    "contrastive": {"ppl": 4.2, "bios_accuracy": 0.7, "params": 1.0e6},
}
SAMPLES = {name: {"continuations": [("Anna Rosa Abbott was", f"born ({name})")]} for name in MODELS}


def _events(path: Path) -> EventAccumulator:
    acc = EventAccumulator(str(path))
    acc.Reload()
    return acc


def _text(acc: EventAccumulator, tag: str) -> str:
    (event,) = acc.Tensors(f"{tag}/text_summary")  # how SummaryWriter.add_text stores a text
    return event.tensor_proto.string_val[0].decode()


def test_report_is_one_chart_per_metric_with_a_run_per_model(tmp_path: Path) -> None:
    tb = tmp_path / "tb" / "evaluate"
    rep = {"models": MODELS, "ratios": report.ratios(MODELS), "notes": ["a note"]}
    report.write_tensorboard(rep, SAMPLES, tb)
    for name, values in MODELS.items():
        acc = _events(tb / name)
        tags = {"stability/ppl", "stability/bios_accuracy", "efficiency/params"}
        if name != "teacher":
            tags |= {f"{t}_vs_teacher" for t in tags}
        assert set(acc.Tags()["scalars"]) == tags, name  # the same tags in every model's run
        (ppl,) = acc.Scalars("stability/ppl")
        assert (ppl.step, ppl.value) == (0, pytest.approx(values["ppl"]))
        assert f"born ({name})" in _text(acc, "samples")
    (ratio,) = _events(tb / "student").Scalars("efficiency/params_vs_teacher")
    assert ratio.value == pytest.approx(0.25)
    table = _text(_events(tb), "report")
    assert "| metric | teacher | student | contrastive | computed on | note |" in table and "a note" in table
    assert "born (" not in table  # samples live in the models' runs, not beside the table

    # A second evaluation replaces the first: one point per model, the new value, no stale run.
    again = {"teacher": {"ppl": 3.0}, "student": {"ppl": 3.9}}
    report.write_tensorboard({"models": again, "ratios": {}, "notes": []}, {}, tb)
    assert [e.value for e in _events(tb / "teacher").Scalars("stability/ppl")] == [pytest.approx(3.0)]
    assert not list((tb / "contrastive").glob("events.out.tfevents.*"))


def test_every_stage_run_carries_the_custom_scalars_layout(tmp_path: Path) -> None:
    for stage in ("teacher", "distill"):
        monitor = Monitor(tmp_path / "tb" / stage, total_steps=1, start_step=0, desc=stage)
        monitor.scalars(1, {"train/loss": 2.0})
        monitor.close()
    layouts = []
    for stage in ("teacher", "distill"):
        (event,) = _events(tmp_path / "tb" / stage).Tensors("custom_scalars__config__")
        layouts.append(layout_pb2.Layout.FromString(event.tensor_proto.string_val[0]))
    assert layouts[0] == layouts[1]  # identical: TensorBoard's merge of the runs' layouts keeps one copy
    charts = {c.title: list(c.multiline.tag) for cat in layouts[0].category for c in cat.chart}
    # One chart matches the loss every training stage logs, so it draws teacher, distill and contrastive.
    assert [t for t, regexes in charts.items() if any(re.fullmatch(r, "train/loss") for r in regexes)]


def test_report_picture_in_the_report_and_in_tensorboard(tmp_path: Path) -> None:
    from PIL import Image

    from stablekd.evaluation import chart

    models = {n: {**v, "task_contradiction": 0.5 - 0.1 * i} for i, (n, v) in enumerate(MODELS.items())}
    rep = {"models": models, "ratios": report.ratios(models), "notes": []}
    paths = report.write_report(rep, SAMPLES, tmp_path / "eval", tmp_path / "tb")
    with Image.open(paths["png"]) as img:  # a PNG a viewer opens: one panel per charted metric
        panels = [k for k, _ in chart.PANELS if k in models["teacher"]]
        assert panels == ["task_contradiction", "bios_accuracy", "ppl"]
        assert img.format == "PNG" and img.size == (chart.PANEL_W * 3, chart.LEGEND_H + chart.PANEL_H)
        # every model's bar is drawn in its colour in the contradiction panel
        pixels = set(img.convert("RGB").crop((0, chart.LEGEND_H, chart.PANEL_W, img.size[1])).getdata())
        for color in chart.COLORS[:3]:
            assert tuple(int(color[i : i + 2], 16) for i in (1, 3, 5)) in pixels
    assert "![the key metrics per model](report.png)" in paths["md"].read_text()
    (image,) = _events(tmp_path / "tb").Images("report")
    assert (image.width, image.height) == Image.open(paths["png"]).size
    # a report with nothing to chart leaves no stale picture behind
    again = report.write_report(
        {"models": {"teacher": {"params": 1.0}}}, {}, tmp_path / "eval", tmp_path / "tb"
    )
    assert "png" not in again and not (tmp_path / "eval" / "report.png").exists()
    assert "report.png" not in again["md"].read_text()
