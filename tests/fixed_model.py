"""A stand-in causal LM whose logits the test chooses, with the head every built model has (model/head.py):
its "trunk" returns the logits themselves as the hidden state and the head is the identity matrix, so a loss
takes the head's chunked path on exactly those logits (x · I = x, exact in floating point)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch

from stablekd.model.head import install_head


class LogitsLM(torch.nn.Module):
    """`trunk(input_ids, **inputs)` -> logits (B, T, R); `vocab`: the tokenizer's size (≤ R: padded rows
    past it are cut), `rows`: rows per chunk of the head (None: its default)."""

    def __init__(
        self,
        trunk: Callable[..., torch.Tensor],
        width: int,
        vocab: int | None = None,
        rows: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.lm_head = torch.nn.Linear(width, width, bias=False, dtype=dtype)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.eye(width, dtype=dtype))
        self.lm_head.weight.requires_grad_(False)
        self.config = SimpleNamespace(get_text_config=lambda: SimpleNamespace())
        install_head(self, vocab or width, rows)

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.lm_head

    @property
    def base_model(self) -> Callable:
        return lambda input_ids, use_cache=False, **inputs: (self.trunk(input_ids, **inputs),)

    def forward(self, input_ids: torch.Tensor, **inputs) -> SimpleNamespace:
        return SimpleNamespace(logits=self.lm_head(self.trunk(input_ids, **inputs)))


def fixed(logits: torch.Tensor, vocab: int | None = None, rows: int | None = None) -> LogitsLM:
    """A LogitsLM that returns `logits` (B, T, R) whatever its input."""
    return LogitsLM(lambda input_ids, **_: logits, logits.shape[-1], vocab, rows, logits.dtype)
