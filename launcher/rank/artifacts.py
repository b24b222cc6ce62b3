"""What ranks read of the stages before them and leave for the ones after, in one place for every stage:
the sharded ZeRO-3 teacher, soft-label batches (offline shards or the online teacher), and the end every
training stage shares (Hugging Face export, DONE.json).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stablekd.data_pipeline.tokenizer import tokenizer_hash
from stablekd.ds_configs import resolve as ds_resolve
from stablekd.launcher import done, models, rundir
from stablekd.launcher.config import ExperimentConfig

if TYPE_CHECKING:  # annotations only
    import torch
    from transformers import PreTrainedTokenizerBase

    from stablekd.launcher.rank import engine


def sharded_teacher(cfg: ExperimentConfig):  # -> model.sharded_teacher.ShardedTeacher
    """The run's teacher from its ZeRO-3 shards, partitioned over this job's ranks (call on every rank)."""
    from stablekd.model.sharded_teacher import load_sharded_teacher  # deepspeed: only on ranks

    return load_sharded_teacher(
        rundir.ckpt_dir(cfg, "teacher"), rundir.ds_path(cfg, "teacher"), models.tokenizer_dir(cfg),
        models.teacher_source(cfg), cfg.data.seq_len, cfg.run.seed,
    )  # fmt: skip


def open_soft_labels(cfg: ExperimentConfig, rank: int, world_size: int, micro_batch_size: int, teacher=None):
    """Soft-label training batches for a consumer stage, offline or online, one interface.

    Both yield decoded batches forever (data_pipeline/encodings.py `decode`: input_ids, loss_mask, and
    topk_ids / topk_logprobs or sample_ids / sample_weights) and save/restore their position
    (state_dict / load_state_dict).
    - Offline (teacher None): the shards of soft_labels/, checked against this run's tokenizer, encoding
      (and its parameters), T and seq_len, in epochs of equal length on every rank
      (data_pipeline/epochs.py); with distill.follow the
      shards are read while the soft_labels stage still writes them (a ShardError naming the shard
      awaited after distill.follow_timeout_s without a new one).
    - Online (`teacher` = `sharded_teacher(cfg)`): the looping training stream labelled in this job with
      the same k and T; every rank runs one teacher forward per batch it draws, all at the same point of
      the loop, so the teacher's ZeRO-3 gathers never meet the student's collectives.
    """
    from stablekd.data_pipeline.encodings import Decoded
    from stablekd.data_pipeline.epochs import EqualEpochs
    from stablekd.data_pipeline.online import OnlineSoftLabels
    from stablekd.data_pipeline.shards.loader import ShardLoader
    from stablekd.data_pipeline.soft_labels import config_meta, encoding_meta, soft_label_reader
    from stablekd.data_pipeline.stream import PackedStream, StreamLoader

    sl, tok_dir, seq_len = cfg.soft_labels, models.tokenizer_dir(cfg), cfg.data.seq_len
    if teacher is not None:
        stream = PackedStream(
            rundir.train_files(cfg), tok_dir, seq_len, micro_batch_size, rank, world_size, cfg.data.num_workers,
            loop=True,
        )  # fmt: skip
        meta = config_meta(sl, teacher.checkpoint_id, tokenizer_hash(tok_dir), teacher.vocab_size, seq_len)
        return OnlineSoftLabels(StreamLoader(stream), teacher, meta)
    meta = encoding_meta(sl, seq_len)
    out = rundir.stage_dir(cfg, "soft_labels")
    reader = soft_label_reader(
        out, {"tokenizer_hash": tokenizer_hash(tok_dir), **meta}, rank, world_size, cfg.data.num_workers,
        follow=cfg.distill.follow, timeout_s=min(cfg.distill.follow_timeout_s, cfg.launch.timeout_s),
    )  # fmt: skip
    return Decoded(EqualEpochs(ShardLoader(reader, micro_batch_size), str(out)), meta)


def finish_training(
    cfg: ExperimentConfig,
    stage: str,
    result: engine.TrainResult,
    lm: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    ds: dict,
    produced: dict,
    inputs: dict,
) -> None:
    """The end every training stage shares, on every rank: the Hugging Face export of `lm` with its
    tokenizer (`<stage dir>/hf`, when the section's export_hf), then DONE.json on rank 0 with the loop's
    figures (checkpoint, steps, tokens, held-out eval loss, parameters) plus the stage's own `produced`."""
    import torch.distributed as dist

    from stablekd.model.build import count_params, export_hf

    out = rundir.stage_dir(cfg, stage)
    figures = {
        "checkpoint": str(out / "ckpt" / result.checkpoint_tag),
        "zero_stage": ds_resolve.zero_stage(ds),
        "world_size": dist.get_world_size(),
        "steps": result.steps,
        "tokens": result.tokens,
        "eval_loss": result.eval_loss,  # held-out next-token cross-entropy
        "params": count_params(lm),
        **produced,
    }
    if getattr(cfg, stage).export_hf:
        export_hf(lm, tokenizer, out / "hf", ds_resolve.zero_stage(ds) == 3)
        figures["hf"] = str(out / "hf")
    if dist.get_rank() == 0:
        done.write_done(cfg, stage, figures, inputs)
    dist.barrier()
