"""What each rank runs for tests/test_engine.py (started by DeepSpeed's per-node launcher, 2 ranks, ZeRO-2):

    python -u -m deepspeed.launcher.launch --world_info=<{"localhost": [0, 1]}> --master_addr=127.0.0.1 \
        --master_port=P --no_local_rank tests/engine_worker.py <run_dir> <result.json>

`engine.train` on a stage whose loss has two terms with different denominators ("tok": next-token NLL
over counted tokens; "seq": per-sequence mean NLL over sequences with a counted token), weights 0.7 / 0.3,
on batches whose -100 masks differ across ranks and micro-batches (`masked_batch`: some micro-batches
count nothing at all). Rank 0 writes the per-step global losses to <result.json>, and which ranks
raised when only rank 0 has held-out batches and there is no filler (all must).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

from stablekd.ds_configs import resolve as ds_resolve
from stablekd.launcher.config import TrainConfig
from stablekd.launcher.rank import engine
from stablekd.launcher.rank.worker import leave
from stablekd.model.build import init_weights
from stablekd.model.head import install_head
from stablekd.model.presets import preset
from stablekd.objectives.lm import IGNORE_INDEX, Loss, shifted_labels

VOCAB, LEN, MICRO, ACCUM, STEPS = 50, 12, 2, 2, 6
WEIGHTS = {"tok": 0.7, "seq": 0.3}
TRAIN = TrainConfig(
    max_steps=STEPS, micro_batch_size=MICRO, grad_accum=ACCUM, lr=1e-2, warmup_steps=2, dtype="fp32",
    eval_every=0, save_every=100, log_every=1,
)  # fmt: skip


def tiny_model() -> torch.nn.Module:
    cfg = LlamaConfig(
        vocab_size=VOCAB, max_position_embeddings=LEN, tie_word_embeddings=False, **preset("tiny")
    )
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    init_weights(model, 7)
    return install_head(model, VOCAB)  # as model/build.py builds every model: lm_loss takes the head's path


def masked_batch(rank: int, index: int) -> dict:
    """Micro-batch `index` of `rank`: random ids; the share of counted tokens depends on (rank, index),
    down to none at all (rank 1's every third micro-batch)."""
    gen = torch.Generator().manual_seed(1000 * rank + index)
    ids = torch.randint(0, VOCAB, (MICRO, LEN), generator=gen)
    keep = 0.0 if (rank == 1 and index % 3 == 0) else (0.2 if rank == 0 else 0.9) * (1 + index % 2) / 2
    labels = torch.where(
        torch.rand(MICRO, LEN, generator=gen) < keep, ids, torch.full_like(ids, IGNORE_INDEX)
    )
    return {"input_ids": ids, "labels": labels}


def term_sums(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    targets = shifted_labels(labels)  # [B, L]
    nll = F.cross_entropy(
        logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    per_seq = (targets != IGNORE_INDEX).sum(-1)  # [B]
    seq = torch.where(per_seq > 0, nll.sum(-1) / per_seq.clamp_min(1), torch.zeros_like(nll[:, 0]))
    return {"tok": nll.sum(), "seq": seq.sum()}


def counts(batch: dict) -> dict[str, int]:
    per_seq = (shifted_labels(batch["labels"]) != IGNORE_INDEX).sum(-1)
    return {"tok": int(per_seq.sum()), "seq": int((per_seq > 0).sum())}


class Batches:
    def __init__(self, rank: int) -> None:
        self.rank, self.i = rank, 0

    def __iter__(self):
        while True:
            self.i += 1
            yield masked_batch(self.rank, self.i - 1)

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]


def main(run_dir: str, result: str) -> None:
    rank, world = engine.setup_distributed(1)
    raw, path = ds_resolve.load("zero2.json")
    ds = ds_resolve.resolve(raw, TRAIN, world, Path(run_dir) / "tb", str(path))
    stage = engine.Stage(
        "teacher", tiny_model(), Batches(rank),
        lambda m, b: Loss(term_sums(m(input_ids=b["input_ids"]).logits, b["labels"])),
        [], 1.0, weights=WEIGHTS, count=counts,
    )  # fmt: skip
    out = engine.train(stage, TRAIN, ds, Path(run_dir), "h")
    # Rank 0 has held-out batches, rank 1 none and no filler: every rank must raise, at the same point,
    # none may go on into collectives the others never join.
    stage.eval_batches = [masked_batch(0, 0)] if rank == 0 else []
    try:
        engine.evaluate(out.engine, stage, filler=None)
        raised = False
    except RuntimeError:
        raised = True
    everyone: list = [None] * world
    torch.distributed.all_gather_object(everyone, raised)
    if rank == 0:
        Path(result).write_text(json.dumps({"losses": out.losses, "eval_raised": everyone}))
    torch.distributed.barrier()
    leave(0)  # as stablekd's own worker ends (launcher/rank/worker.py)


if __name__ == "__main__":
    main(*sys.argv[1:])
