"""Stage `teacher`: train (or continue) the teacher LM with DeepSpeed ZeRO on the packed corpus stream.

With teacher.init_from a previous teacher run, training starts from that run's ZeRO checkpoint (loaded rank
by rank, never consolidated; same world size and ZeRO stage) and its tokenizer; with teacher.model a
Hugging Face directory, from its weights and (when it has one) its tokenizer. A task dataset (.jsonl prompt/response or chat records in
data.paths) then fine-tunes it with loss on the responses only (data_pipeline/tasks.py).

Leaves teacher/ckpt/<tag> (one ZeRO shard per rank, kept sharded for the soft-label stage),
teacher/hf (Hugging Face format, unless teacher.export_hf=false) and teacher/DONE.json.
"""

from __future__ import annotations

import json

from transformers.integrations import HfDeepSpeedConfig

from stablekd.data_pipeline.sources import SourceStats
from stablekd.data_pipeline.stream import PackedStream, StreamLoader, eval_batches
from stablekd.data_pipeline.tokenizer import load_tokenizer, tokenizer_hash
from stablekd.ds_configs.resolve import zero_stage
from stablekd.launcher import done, models, rundir
from stablekd.launcher.config import ExperimentConfig
from stablekd.launcher.rank import artifacts, engine
from stablekd.model.build import build_model, flops_per_token
from stablekd.objectives.lm import lm_loss


def run(cfg: ExperimentConfig) -> None:
    rank, world = engine.setup_distributed(cfg.launch.threads_per_rank, cfg.launch.timeout_s)
    engine.seed_rng(cfg.run.seed)  # runs of one config draw the same (dropout, any sampling)
    run_dir = cfg.run_dir
    ds = json.loads(rundir.ds_path(cfg, "teacher").read_text())
    zero3 = zero_stage(ds) == 3
    # Alive while the model is built: transformers then constructs it inside deepspeed.zero.Init.
    hf_ds = HfDeepSpeedConfig(ds) if zero3 else None  # noqa: F841
    tok_dir = models.tokenizer_dir(cfg)
    tokenizer = load_tokenizer(tok_dir)
    seq_len, micro = cfg.data.seq_len, ds["train_micro_batch_size_per_gpu"]
    model = build_model(models.teacher_source(cfg), tokenizer, seq_len, cfg.run.seed)
    # Every rank reads the whole corpus (it keeps the global document index), so rank 0's counts suffice.
    stats = SourceStats()
    files = rundir.train_files(cfg)
    stream = PackedStream(files, tok_dir, seq_len, micro, rank, world, cfg.data.num_workers, stats=stats)
    evals = eval_batches(
        rundir.eval_files(cfg), tok_dir, seq_len, micro, cfg.teacher.eval_batches, rank, world
    )
    stage = engine.Stage(
        "teacher", model, StreamLoader(stream), lm_loss, evals, flops_per_token(model, seq_len),
        init_checkpoint=models.teacher_init_checkpoint(cfg),
    )  # fmt: skip
    result = engine.train(
        stage, cfg.teacher, ds, run_dir, done.stage_hash(cfg, "teacher"), cfg.run.trace_samples
    )

    if rank == 0:
        skipped = {
            k: v for k, v in stats.as_dict().items() if k in ("empty_files", "empty_lines", "bad_lines") and v
        }
        if skipped:
            print(f"[teacher] data: skipped and counted {skipped}", flush=True)
        if stats.task_records:
            print(
                f"[teacher] data: {stats.task_records} of {stats.documents} documents are task records "
                "(loss on their responses only)",
                flush=True,
            )
        if stats.other_split:  # the eval share of data.paths (rundir.train_files)
            print(
                f"[teacher] data: {stats.other_split} documents held out for eval "
                f"(data.eval_fraction {files.eval_fraction}), {stats.documents} trained on",
                flush=True,
            )
    artifacts.finish_training(
        cfg, "teacher", result, result.engine.module, tokenizer, ds,
        {"data_stats": stats.as_dict()},  # complete once the stream has passed the end of the corpus
        {"tokenizer_hash": tokenizer_hash(tok_dir), "train_files": [str(f) for f in files]},
    )  # fmt: skip
