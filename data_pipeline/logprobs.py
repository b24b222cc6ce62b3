"""How the soft-label encodings (data_pipeline/encodings.py) choose and store log-probabilities: the top k
of a distribution at temperature T, and a log-prob in one byte or in float16.

One byte: the code c = round(255 · √p) (p = exp(log-prob)), decoded as p̂ = (c / 255)². The error is
|√p̂ − √p| ≤ 1/510, i.e. |p̂ − p| ≤ √p / 255 + 1/260100: 0.37 % of p at p = 0.9, 3.9 % at p = 0.01;
probabilities below 1/260100 (3.8e-6) decode as 0. Square-root steps spend the codes where the mass is,
unlike uniform log-prob steps (a constant ~3 % relative error even on the top entry).

float16: −inf (zero probability) is stored as the float16 floor, −65504, which the losses read back as
−inf (objectives/divergences.py defines it; objectives/kd.py states the convention).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from stablekd.objectives.divergences import FP16_FLOOR
from stablekd.objectives.lm import chunk_rows

_CODES = 255


def _rows(logits: torch.Tensor, chunk: int) -> Iterable[torch.Tensor]:
    flat = logits.reshape(-1, logits.shape[-1])  # [..., V] -> [N, V]
    for s in range(0, flat.shape[0], chunk):
        yield flat[s : s + chunk]


def compress(
    logits: torch.Tensor, k: int, temperature: float, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the teacher distribution at temperature T.

    Args:
        logits: [..., V] raw teacher logits (any float dtype; computed in fp32).
        k: entries kept per token.
        temperature: T; the distribution is softmax(logits / T).
        chunk: rows processed at once, bounding the fp32 [chunk, V] temporaries; None = `chunk_rows(V)`.

    Returns:
        topk_ids [..., k] int64 and topk_logprobs [..., k] fp32 = log_softmax(logits / T) at those ids,
        sorted descending.
    """
    V = logits.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"k must be in [1, V={V}], got {k}")
    ids, vals = [], []
    for x in _rows(logits, chunk or chunk_rows(V)):
        logp = F.log_softmax(x.float() / temperature, dim=-1)  # [n, V]
        v, i = logp.topk(k, dim=-1, sorted=True)  # [n, k]
        ids.append(i)
        vals.append(v)
    shape = (*logits.shape[:-1], k)
    if not ids:  # zero tokens
        return torch.empty(shape, dtype=torch.long), torch.empty(shape, dtype=torch.float32)
    return torch.cat(ids).reshape(shape), torch.cat(vals).reshape(shape)


def tail_mass(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """[..., k] -> [...]: teacher probability outside the top k, 1 - sum(exp(topk_logprobs)), in fp32.

    Clamped at 0: fp16 rounding of the stored log-probs can push the sum a hair above 1.
    """
    return (1.0 - topk_logprobs.float().exp().sum(-1)).clamp_min(0.0)


def quantize(logprobs: torch.Tensor) -> torch.Tensor:
    """Log-probs -> uint8 codes round(255 · √p) (module docstring)."""
    return (logprobs.float().mul(0.5).exp() * _CODES).round().clamp(0, _CODES).to(torch.uint8)


def dequantize(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (any integer dtype) -> float32 log-probs 2 · log(c / 255); code 0 -> −inf."""
    return 2.0 * torch.log(codes.float() / _CODES)


def half(x: torch.Tensor, high: float = -FP16_FLOOR) -> np.ndarray:
    """float16 with values beyond its range clamped to [FP16_FLOOR, high] (−inf to the floor)."""
    return x.float().clamp(FP16_FLOOR, high).to(torch.float16).cpu().numpy()


def store_logprobs(lp: torch.Tensor, bits: int) -> np.ndarray:
    """Log-probs as stored: uint8 codes (bits 8) or float16 with -inf as the float16 floor (bits 16)."""
    if bits == 8:
        return quantize(lp).cpu().numpy()
    return half(lp, high=0.0)


def load_logprobs(a: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored log-probs (as a reader returns them) -> float32, −inf where the probability is 0."""
    if bits == 8:
        return dequantize(a)
    lp = a.float()
    return lp.masked_fill(lp <= FP16_FLOOR, -math.inf)
