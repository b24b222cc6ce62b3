"""Where a run stands, read from its directory alone: `stablekd status RUN_DIR`, stage headlines, the report.

Per stage of the registry, in pipeline order:
- done: DONE.json present; its headline figures (`headline`, also printed by the driver when a stage ends);
- resumable: a checkpoint whose complete.json names a tag (launcher/rank/engine.py): its step, and which ranks
  wrote files into that tag (DeepSpeed's `*zero_pp_rank_<r>_mp_rank_00_*`, our `stablekd_rank<r>.pt`);
  or, for a stage that writes shards (soft_labels), the records its ranks committed;
- started: something on disk (its directory, TensorBoard, log) but nothing to resume from;
- not started.
With the last value of the loss and throughput scalars under tb/<stage> (launcher/rank/engine.py's tags).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from stablekd.data_pipeline.files import read_marker
from stablekd.launcher.stages import REGISTRY, spec

# The scalars `status` shows, when a stage logged them (x-axis: the optimizer step; soft_labels: batches).
SCALARS = ("train/loss", "eval/loss", "perf/tokens_per_s", "perf/mfu", "soft_labels/records")
# Files a rank writes into a checkpoint tag: ZeRO's per-rank model/optimizer shards and our own state.
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_|stablekd_rank(\d+)\.pt$")


@dataclass
class StageStatus:
    name: str
    state: str  # "done", "resumable", "started" or "not started"
    detail: str  # the DONE.json headline, or where a resume starts and what it finds
    step: int | None = None  # step of the last complete checkpoint
    tag: str | None = None  # its tag (ckpt/<tag>)
    world_size: int | None = None  # ranks that wrote it (complete.json)
    ranks: list[int] = field(default_factory=list)  # ranks with files in ckpt/<tag>
    scalars: dict[str, tuple[int, float]] = field(default_factory=dict)  # tag -> (step, last value)


def _si(n: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.4g}"


def headline(stage: str, done: dict, stage_dir: Path) -> str:
    """The figures a stage's DONE.json (and, for evaluate, its report.json) says most about it."""
    p = done.get("produced", {})
    parts = []
    if p.get("eval_loss") is not None:  # null: the stage had no held-out text
        parts.append(f"eval loss {p['eval_loss']:.4f}")
    if "steps" in p:
        parts.append(f"{p['steps']} steps, {_si(p.get('tokens', 0))} tokens")
    labels = p.get("soft_labels")
    if isinstance(labels, dict):
        mass = labels.get("fidelity", {}).get("topk_mass")
        parts.append(
            f"{labels['records']} sequences in {labels['shards']} shards"
            + (f", kept mass {mass:.3f}" if mass is not None else "")
        )
    cands = p.get("candidates")
    if isinstance(cands, dict):
        parts.append(f"{cands['groups']} candidate groups of {cands['group_size']}")
    report = stage_dir / "report.json"
    if "report_json" in p and report.is_file():
        models = json.loads(report.read_text())["models"]
        # the corpus's known truth where there is one (the built-in bios), else held-out perplexity
        key = "bios_accuracy" if any("bios_accuracy" in m for m in models.values()) else "ppl"
        parts.append(
            ("bios accuracy " if key == "bios_accuracy" else "perplexity ")
            + ", ".join(f"{n} {m[key]:.3f}" for n, m in models.items() if key in m)
        )
    return "; ".join(parts) or "finished"


def checkpoint_ranks(tag_dir: Path) -> list[int]:
    """Ranks that wrote files into a checkpoint tag directory."""
    ranks = set()
    for f in tag_dir.iterdir() if tag_dir.is_dir() else []:
        m = _RANK_FILE.search(f.name)
        if m:
            ranks.add(int(m.group(1) or m.group(2)))
    return sorted(ranks)


def last_scalars(tb_dir: Path) -> dict[str, tuple[int, float]]:
    """tag -> (step, value) of the last event of each SCALARS tag in tb_dir (every event file there; a
    resumed run's later file replaces the steps it logged again)."""
    if not tb_dir.is_dir() or not any(tb_dir.glob("events.out.tfevents.*")):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})  # 0 = keep every event
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    out = {}
    for tag in SCALARS:
        if tag in tags:
            last = acc.Scalars(tag)[-1]
            out[tag] = (last.step, last.value)
    return out


def _ranks_text(ranks: list[int], world: int | None) -> str:
    text = f"files from rank{'s' if len(ranks) != 1 else ''} {','.join(map(str, ranks)) or 'none'}"
    if world is not None:
        missing = sorted(set(range(world)) - set(ranks))
        text += f" of {world}" + (f", NONE from {','.join(map(str, missing))}" if missing else "")
    return text


def _shards_text(stage_dir: Path) -> str | None:
    """Records committed per shard directory (manifest.r<rank>.json of each writer rank), if any."""
    parts = []
    for d in sorted({m.parent for m in stage_dir.glob("**/manifest.r*.json")}):
        per_rank = [json.loads(m.read_text()) for m in sorted(d.glob("manifest.r*.json"))]
        ranks = ",".join(str(m["rank"]) for m in per_rank)
        final = sum(bool(m.get("final")) for m in per_rank)
        parts.append(
            f"{d.relative_to(stage_dir.parent)}/: {sum(m['records'] for m in per_rank)} records from ranks "
            f"{ranks} ({final} final)"
        )
    return "; ".join(parts) or None


def _max_steps(run_dir: Path, stage: str) -> int | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    section = (yaml.safe_load(path.read_text()) or {}).get(stage) or {}
    return section.get("max_steps")


def stage_status(run_dir: Path, stage: str) -> StageStatus:
    run_dir = Path(run_dir)
    stage_dir = run_dir / spec(stage).out_dir
    scalars = last_scalars(run_dir / spec(stage).tb_dir)
    done = stage_dir / "DONE.json"
    if done.is_file():
        return StageStatus(
            stage, "done", headline(stage, json.loads(done.read_text()), stage_dir), scalars=scalars
        )
    ckpt = run_dir / spec(stage).ckpt_dir
    marker = read_marker(ckpt)
    if marker is not None:
        tag, world = marker["tag"], marker.get("world_size")
        ranks = checkpoint_ranks(ckpt / tag)
        total = _max_steps(run_dir, stage)
        detail = f"at step {marker['step']}" + (f" of {total}" if total else "")
        detail += f" ({ckpt / tag}; {_ranks_text(ranks, world)})"
        # A save killed half-way leaves a newer tag that complete.json does not name: never loaded.
        newer = sorted(p.name for p in ckpt.glob("step*") if p.is_dir() and p.name > tag)
        if newer:
            detail += f"; incomplete save {', '.join(newer)} ignored"
        return StageStatus(stage, "resumable", detail, marker["step"], tag, world, ranks, scalars)
    shards = _shards_text(stage_dir) if stage_dir.is_dir() else None
    if shards:
        return StageStatus(stage, "resumable", shards + "; each rank resumes after its own", scalars=scalars)
    traces = [stage_dir, run_dir / spec(stage).tb_dir, run_dir / "logs" / f"{stage}.log"]
    if any(p.exists() for p in traces):
        what = "no complete checkpoint, starts from step 0" if spec(stage).trains else "not finished"
        return StageStatus(stage, "started", what, scalars=scalars)
    return StageStatus(stage, "not started", "", scalars=scalars)


def run_status(run_dir: Path) -> list[StageStatus]:
    """Every registry stage of the run directory, in pipeline order."""
    return [stage_status(Path(run_dir), s.name) for s in REGISTRY]


def _value(tag: str, v: float) -> str:
    if tag == "perf/mfu":
        return f"{100 * v:.2f}%"
    return _si(v) if tag.startswith(("perf/", "soft_labels/")) else f"{v:.4f}"


def format_status(run_dir: Path, statuses: list[StageStatus]) -> str:
    width = max(len(s.name) for s in statuses)
    lines = [f"{run_dir}"]
    for s in statuses:
        lines.append(f"  {s.name:<{width}}  {s.state:<11}  {s.detail}".rstrip())
        if s.scalars:
            steps = {step for step, _ in s.scalars.values()}
            at = f"step {steps.pop()}: " if len(steps) == 1 else ""
            values = ", ".join(
                f"{tag} {_value(tag, v)}" + ("" if at else f" (step {step})")
                for tag, (step, v) in s.scalars.items()
            )
            lines.append(f"  {'':<{width}}  {'':<11}  tb {at}{values}")
    return "\n".join(lines)


def report_table(run_dir: Path) -> str | None:
    """The report's main table (one row per metric, one column per model) from eval/report.json, columns
    aligned for a terminal; None when the run has no report."""
    path = Path(run_dir) / spec("evaluate").out_dir / "report.json"
    if not path.is_file():
        return None
    from stablekd.evaluation.report import markdown  # torch and transformers: only when there is a report

    rows = [
        [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
        for line in markdown(
            {k: v for k, v in json.loads(path.read_text()).items() if k in ("models", "sizes", "missing")}, {}
        ).splitlines()
        if line.startswith("|")
    ]
    rows = [r for r in rows if not set("".join(r)) <= set("-: ")]  # the |---| row, made anew below
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    last = len(widths) - 1

    text = (0, last - 1, last)  # label, what it was computed on and note left, figures right

    def cell(i: int, t: str) -> str:
        return t.ljust(widths[i]) if i in text else t.rjust(widths[i])

    rule = ["-" * w if i in text else "-" * (w - 1) + ":" for i, w in enumerate(widths)]
    lines = ["| " + " | ".join(cell(i, t) for i, t in enumerate(r)) + " |" for r in rows]
    lines.insert(1, "| " + " | ".join(rule) + " |")
    return "\n".join(lines)


def wall(seconds: float) -> str:
    """12.3s, 4m05s, 1h02m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"
