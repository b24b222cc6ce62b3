"""Full disks: a stage that cannot fit is refused before it starts; one whose disk fills anyway (another
process wrote) ends in one line naming the path and the errno, never a traceback (launcher/diskfull.py, which
ranks and the launching process share).

Before a stage starts, the launching process compares an estimate of what the stage will write with the
free space of the filesystem it writes to (`shutil.disk_usage`). The estimates are estimates, on the
large side so that a stage refused is one that would not have fit:
- soft labels: bytes per record (the encoding's arrays, data_pipeline/encodings.py `record_bytes`) × records,
  where records = soft_labels.max_sequences, or one pass of the corpus: its bytes × tokens per byte
  measured on its first documents ÷ seq_len; plus candidate groups at int32 and full seq_len.
- checkpoints: parameters × 16 bytes (DeepSpeed's ZeRO checkpoint: the fp32 master copy and Adam's two
  moments, 12 bytes, in the ranks' optim_states files; the weights in the training dtype, at most 4 more,
  in the model_states files) × (keep_checkpoints + 1) tags: launcher/rank/engine.py deletes an old tag only
  after the new one is complete, so one more than kept exists during a save; plus the Hugging Face export
  (4 bytes a parameter) when export_hf. Only what is not on disk yet counts: the stage directory's
  current size (a resumed stage's checkpoints and shards) is taken off.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from stablekd.launcher import models, rundir
from stablekd.launcher.config import ConfigError, ExperimentConfig
from stablekd.launcher.diskfull import free_bytes
from stablekd.launcher.stages import spec
from stablekd.model.presets import PRESETS, param_count

# DeepSpeed checkpoint bytes per parameter: fp32 master (4) + Adam exp_avg (4) + exp_avg_sq (4) + weights (<= 4).
CKPT_BYTES_PER_PARAM = 16
EXPORT_BYTES_PER_PARAM = 4  # save_pretrained of fp32 weights (bf16 halves it: the estimate stays high)
MARGIN = 1.1  # on top of every estimate: shard headers, manifests, tokenizer copies, rounding
SAMPLE_BYTES = 1 << 20  # the corpus text tokenized to measure tokens per byte


def _size(path: Path) -> int:
    """Bytes of the files under `path` (0 if absent)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except FileNotFoundError:
                pass
    return total


def _corpus_tokens(cfg: ExperimentConfig, bound: bool = False) -> int | None:
    """Tokens in one pass of the training files: their bytes × tokens per byte of their first documents.
    bound: at most one token per byte instead, without loading a tokenizer (None for gzipped files, whose
    size on disk bounds nothing)."""
    from stablekd.data_pipeline.sources import iter_documents
    from stablekd.data_pipeline.tokenizer import load_tokenizer

    files = rundir.train_files(cfg)
    total = sum(Path(f).stat().st_size for f in files)
    if bound:
        return None if any(str(f).endswith(".gz") for f in files) else total
    tok = load_tokenizer(models.tokenizer_dir(cfg))
    sample, tokens = 0, 0
    for doc in iter_documents(files):
        if sample >= SAMPLE_BYTES:
            break
        sample += len(doc.encode())
        tokens += len(tok(doc, add_special_tokens=False)["input_ids"]) + 1  # + the separator
    return math.ceil(total * tokens / max(1, sample))


def soft_labels_bytes(cfg: ExperimentConfig, bound: bool = False) -> tuple[int, str] | None:
    """(estimated bytes, how it was counted) of everything the soft_labels stage writes. bound: an upper
    bound that loads no tokenizer (4-byte ids, one token per corpus byte; None where there is none)."""
    from stablekd.data_pipeline.encodings import record_bytes
    from stablekd.data_pipeline.soft_labels import config_meta
    from stablekd.data_pipeline.tokenizer import load_tokenizer

    sl, seq_len = cfg.soft_labels, cfg.data.seq_len
    vocab = 1 << 30 if bound else len(load_tokenizer(models.tokenizer_dir(cfg)))  # 1 << 30: int32 ids
    per_record = record_bytes(config_meta(sl, "", "", vocab, seq_len))
    tokens = None if sl.max_sequences else _corpus_tokens(cfg, bound)
    if not sl.max_sequences and tokens is None:
        return None
    records = sl.max_sequences or math.ceil(tokens / seq_len)
    groups = sl.candidate_contexts * (sl.candidates_per_context + 1) if sl.candidates else 0
    total = records * per_record + groups * seq_len * 4
    how = (
        f"{records} sequences × {seq_len} tokens × {per_record / seq_len:.1f} bytes/token ({sl.encoding})"
        + (f" + {groups} candidate rows" if groups else "")
    )
    return math.ceil(total * MARGIN), how


def _params(cfg: ExperimentConfig, stage: str) -> int:
    """Parameters of the model a training stage trains: a preset with the run's own SentencePiece
    vocabulary by arithmetic (building even a meta-device model imports transformers: ~5 s a launch), any
    other model on the meta device."""
    name = models.teacher_source(cfg) if stage == "teacher" else cfg.student.model
    if name in PRESETS and models.trains_tokenizer(cfg):
        return param_count(name, cfg.tokenizer.vocab_size)
    return sum(p.numel() for p in models.meta_model(cfg, stage)[1].parameters())


def checkpoint_bytes(cfg: ExperimentConfig, stage: str) -> tuple[int, str]:
    """(estimated bytes, how it was counted) of a training stage's checkpoints at their peak, and its export."""
    params = _params(cfg, stage)
    section = getattr(cfg, stage)
    tags = section.keep_checkpoints + 1
    total = params * CKPT_BYTES_PER_PARAM * tags + (
        params * EXPORT_BYTES_PER_PARAM if section.export_hf else 0
    )
    how = f"{params / 1e6:.2f}M parameters × {CKPT_BYTES_PER_PARAM} bytes × {tags} checkpoint tags" + (
        " + the Hugging Face export" if section.export_hf else ""
    )
    return math.ceil(total * MARGIN), how


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def check(cfg: ExperimentConfig, stage: str) -> None:
    """Refuse (ConfigError) a stage whose estimated output does not fit its filesystem's free space."""
    out = rundir.stage_dir(cfg, stage)
    free = free_bytes(out)
    if stage == "soft_labels":
        bound = soft_labels_bytes(cfg, bound=True)  # no tokenizer loaded when even the bound fits
        estimate, how = bound if bound and bound[0] - _size(out) <= free else soft_labels_bytes(cfg)
    elif spec(stage).trains:
        estimate, how = checkpoint_bytes(cfg, stage)
    else:
        return  # the report: kilobytes
    need = estimate - _size(out)
    if need > free:
        raise ConfigError(
            f"[{stage}] needs about {_mb(need)} more in {out} (estimate: {how}), but its filesystem has "
            f"{_mb(free)} free: free space or use a run.out_dir on a larger filesystem"
        )
