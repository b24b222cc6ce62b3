"""Causal LM cross-entropy as (sum, count), so the caller can divide by the *global* token count.

DESIGN §5: positions labelled -100 count for nothing; the mean is over counted tokens of the global
batch (all micro-batches of a step on all ranks), so neither accumulation nor world size changes the scale.
"""

from __future__ import annotations

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
