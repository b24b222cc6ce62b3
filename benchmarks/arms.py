"""Training and scoring one arm of a distillation benchmark, shared by benchmarks/distill.py and
benchmarks/cross_tokenizer.py: each arm in its own directory that links a finished run's inputs, trained
with the distill stage's own assembly (launcher/rank/distill_parts.py) at world size 1, exported and scored as
the evaluate stage loads models."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
from transformers.integrations import HfDeepSpeedConfig

from stablekd.data_pipeline.align import TokenBytes
from stablekd.data_pipeline.files import read_marker
from stablekd.data_pipeline.stream import PackedStream, StreamLoader, eval_batches
from stablekd.data_pipeline.tokenizer import load_tokenizer
from stablekd.ds_configs.resolve import zero_stage
from stablekd.evaluation import report
from stablekd.evaluation.bios_probe import HFGenerator, probe
from stablekd.launcher import models, rundir
from stablekd.launcher.config import load_config, save_config
from stablekd.launcher.driver import prepare
from stablekd.launcher.rank import engine
from stablekd.launcher.rank.distill_parts import build_stage, student_batches
from stablekd.model.build import build_model, count_params, flops_per_token, load_model
from stablekd.model.teacher_checkpoint import UNIVERSAL_SUFFIX, make_universal
from stablekd.objectives.lm import lm_loss

# --- arm directories -----------------------------------------------------------------------------


def arm_config(src: Path, arm_dir: Path, args, online: bool, alpha: float | None = None, extra=()):
    """The run's config with out_dir = arm_dir and this benchmark's settings (+ `extra` overrides); arm_dir
    links the run's inputs."""
    arm_dir.mkdir(parents=True)
    for part in ("tokenizer", "data", "soft_labels"):
        if (src / part).exists():
            (arm_dir / part).symlink_to(src / part)  # read only
    (arm_dir / "ds").mkdir()
    if (src / "ds" / "teacher.json").is_file():
        shutil.copy(src / "ds" / "teacher.json", arm_dir / "ds" / "teacher.json")
    overrides = [
        f"run.out_dir={arm_dir}",
        "launch.nproc_per_node=1",
        "launch.hostfile=",
        "distill.log_every=1",  # perf/step_time_s for every step: the median below
        "distill.eval_every=0",  # evaluated once, at the last step
        "distill.save_every=1000000000",  # saved once, at the last step
        "distill.export_hf=false",  # exported here, for the arms scored
        "distill.follow=false",
        f"distill.online={str(online).lower()}",
        f"distill.alpha={args.alpha if alpha is None else alpha}",
    ]
    if args.student:
        overrides.append(f"student.model={args.student}")
    if args.dtype:
        overrides.append(f"distill.dtype={args.dtype}")
    cfg = load_config(src / "config.yaml", [*overrides, *extra])
    save_config(cfg, arm_dir / "config.yaml")
    return cfg


def universal_teacher(src: Path, arm_dir: Path) -> str | None:
    """Give arm_dir a teacher/ckpt loadable at world size 1; None when ready, else why not.

    Same world size: the run's teacher/ is linked. Otherwise a fresh teacher/ckpt holds a copy of
    complete.json, a link to the tag's shards and `<tag>_universal` (the run's, if it has one; else made
    here by `make_universal`, in the temp folder only).
    """
    ckpt = src / "teacher" / "ckpt"
    marker = read_marker(ckpt)
    if marker is None:
        return f"{ckpt}/complete.json missing: no complete teacher checkpoint"
    if int(marker["world_size"]) == 1:
        (arm_dir / "teacher").symlink_to(src / "teacher")
        return None
    tag, out = marker["tag"], arm_dir / "teacher" / "ckpt"
    out.mkdir(parents=True)
    shutil.copy(ckpt / "complete.json", out / "complete.json")
    (out / tag).symlink_to(ckpt / tag)
    universal = tag + UNIVERSAL_SUFFIX
    if (ckpt / universal / "zero").is_dir():
        (out / universal).symlink_to(ckpt / universal)
        return None
    print(f"teacher checkpoint of {marker['world_size']} ranks -> {universal}, once", flush=True)
    t0 = time.perf_counter()
    try:
        make_universal(out, 1)  # reads the linked shards, writes into the temp folder only
    except SystemExit as e:  # the conversion failed: the online arm is skipped, saying why
        return " ".join(str(e).split())[:500]
    print(f"  converted in {time.perf_counter() - t0:.1f}s", flush=True)
    return None


# --- training arms -------------------------------------------------------------------------------


def train_arm(cfg, kind: str, steps: int, teacher=None) -> dict:
    """Train one arm to `steps` steps with engine.train; returns its summary and the engine."""
    cfg.distill.max_steps = steps
    ds = prepare.prepare_ds_config(cfg, "distill")  # <arm>/ds/distill.json, world size 1
    zero3 = zero_stage(ds) == 3
    keep = HfDeepSpeedConfig(ds) if zero3 else None  # noqa: F841  (student built inside zero.Init)
    tok_dir, L = models.student_tokenizer_dir(cfg), cfg.data.seq_len  # its own across tokenizers
    tokenizer = load_tokenizer(tok_dir)
    student = build_model(cfg.student.model, tokenizer, L, cfg.run.seed)  # same seed: same initial weights
    micro, d = ds["train_micro_batch_size_per_gpu"], cfg.distill
    evals = eval_batches(rundir.eval_files(cfg), tok_dir, L, micro, d.eval_batches, 0, 1)
    fpt = flops_per_token(student, L)
    if kind == "ce":
        stream = PackedStream(
            rundir.train_files(cfg), tok_dir, L, micro, 0, 1, cfg.data.num_workers, loop=True
        )
        stage = engine.Stage("distill", student, StreamLoader(stream), lm_loss, evals, fpt)
    else:
        batches, aligner = student_batches(cfg, 0, 1, micro, tokenizer, teacher, student, zero3)
        stage = build_stage(cfg, student, tokenizer, batches, evals, aligner)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    result = engine.train(stage, d, ds, cfg.run_dir, "bench")
    wall = time.perf_counter() - t0
    return {
        "result": result,
        "tokenizer": tokenizer,
        "zero3": zero3,
        "bf16": bool(ds.get("bf16", {}).get("enabled")),
        "zero_stage": zero_stage(ds),
        "params": count_params(student),
        "wall_s": wall,
        "load_average": [load0, os.getloadavg()[0]],  # 1-minute load before and after: other work skews times
    }


def on_policy_split(cfg) -> dict[str, float | None]:
    """Mean seconds per on-policy micro-batch the student spent sampling and the teacher scoring (the rest
    of a step is the update and the offline micro-batches), and the generated tokens per one."""
    from stablekd.launcher.rank.monitor import read_scalars

    tb = cfg.run_dir / "tb" / "distill"
    out = {}
    for key in ("generate_s", "teacher_s", "generated_tokens"):
        values = list(read_scalars(tb, f"train/{key}").values())
        out[key] = statistics.mean(values) if values else None
    return out


def step_times(cfg, warmup: int) -> list[float]:
    """Per-step wall times the loop logged (perf/step_time_s, log_every = 1), warm-up steps dropped."""
    from stablekd.launcher.rank.monitor import read_scalars

    times = read_scalars(cfg.run_dir / "tb" / "distill", "perf/step_time_s")
    return [v for s, v in sorted(times.items()) if s > warmup]


# --- quality -------------------------------------------------------------------------------------


def device_dtype() -> tuple[torch.device, torch.dtype]:
    """As the evaluate stage loads models: fp32 on CPU, bf16 (else fp16) on a GPU."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.device("cpu"), torch.float32


def score(hf_dir: Path, cfg, people: list, speed_prompts: list[str]) -> dict[str, float]:
    """Held-out perplexity, bios probe on trained people, generation tokens/s of one exported model."""
    device, dtype = device_dtype()
    tok_dir = hf_dir  # exported with its tokenizer: the run's, or the student's own across tokenizers
    tok = load_tokenizer(tok_dir)
    model = load_model(tok_dir, tok, dtype).to(device).eval()
    ecfg = cfg.evaluate
    gen = HFGenerator(model, tok, ecfg.temperature, ecfg.top_p, ecfg.batch_size)
    m: dict[str, float] = {}
    with torch.inference_mode():
        held = rundir.eval_files(cfg)
        if held:
            batches = eval_batches(
                held, tok_dir, cfg.data.seq_len, report.PPL_MICRO_BATCH, ecfg.ppl_batches, 0, 1
            )
            if batches:  # a user corpus's held-out share may hold no document
                ppl = report.held_out_scores(model, batches, TokenBytes.from_tokenizer(tok).lengths)
                m["ppl"], m["ece"], m["bpb"] = ppl.ppl, ppl.ece, ppl.bits_per_byte
        if people:
            m.update(probe(gen, people, [], ecfg).metrics)  # trained people only: what the goals are about
        m["gen_tokens_per_s"] = report.generation_speed(gen, speed_prompts, ecfg.max_new_tokens)
    m["params"] = count_params(model)
    return m


def teacher_figures(src: Path, cfg, people: list, speed_prompts: list[str]) -> tuple[dict, str]:
    """The teacher's row: <run>/eval/report.json if the evaluate stage ran, else teacher/hf scored here."""
    rep = src / "eval" / "report.json"
    if rep.is_file():
        models = json.loads(rep.read_text()).get("models", {})
        if "teacher" in models:
            return models["teacher"], str(rep)
    hf = src / "teacher" / "hf"
    if (hf / "config.json").is_file():
        return score(hf, cfg, people, speed_prompts), f"{hf} (scored here)"
    return {}, "none: no eval/report.json and no teacher/hf"


def median_or_none(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None
