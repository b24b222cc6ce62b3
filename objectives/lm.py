"""Causal LM cross-entropy as (sum, count), so the caller can divide by the *global* token count.

DESIGN §5: positions labelled -100 count for nothing; the mean is over counted tokens of the global
batch (all micro-batches of a step on all ranks), so neither accumulation nor world size changes the scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels (B, T) -> targets (B, T) for logits (B, T): position t predicts labels[t + 1]; the last predicts nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL of logits (B, T, V) against labels (B, T), and the number of counted tokens.

    Computed in fp32 whatever the logits' dtype; a batch with no counted token gives (0, 0), not NaN.
    """
    targets = shifted_labels(labels)
    loss = F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, (targets != IGNORE_INDEX).sum()


@dataclass
class Loss:
    """What a stage's loss returns for one micro-batch."""

    sums: dict[str, torch.Tensor]  # term -> summed (not averaged) loss, with its graph
    metrics: dict[str, tuple[float, float]] = field(
        default_factory=dict
    )  # name -> (sum, count), logged as a mean


def lm_counts(batch: dict) -> dict[str, int]:
    """Tokens a next-token loss counts in this batch (labels not -100 after the shift), for every term."""
    n = int((shifted_labels(batch["labels"]) != IGNORE_INDEX).sum())
    return {"lm": n}


def lm_loss(model: torch.nn.Module, batch: dict) -> Loss:
    """Next-token cross-entropy: the teacher's loss (term "lm")."""
    logits = model(input_ids=batch["input_ids"]).logits  # (B, T, V)
    return Loss({"lm": nll_sum(logits, batch["labels"])[0]})
