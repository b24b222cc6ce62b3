"""Causal LM cross-entropy as (sum, count), so the caller can divide by the *global* token count.

Positions labelled -100 count for nothing; the mean is over counted tokens of the global
batch (all micro-batches of a step on all ranks), so neither accumulation nor world size changes the scale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels (B, T) -> targets (B, T) for logits (B, T): position t predicts labels[t + 1]; the last predicts nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


# Rows of a (rows, V) logit matrix processed at once: their float32 temporaries stay near 64 MiB at any V
# (8,192 rows at V 2,048; 110 at V 152k), so no loss holds float32 (B, T, V) beside the logits themselves.
CHUNK_ELEMENTS = 1 << 24


def chunk_rows(vocab: int) -> int:
    """Rows per chunk for a vocabulary of `vocab` ids (CHUNK_ELEMENTS float32 values)."""
    return max(1, CHUNK_ELEMENTS // max(1, vocab))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for bf16/fp16/fp32 inputs; float64 stays float64 so gradcheck is meaningful."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def live_chunks(rows_alive: torch.Tensor, rows: int) -> list[bool]:
    """Per chunk of `rows` rows, whether any of its rows is alive: one host sync for the whole batch, not
    one per chunk (at a 152k vocabulary a batch of 16k tokens is ~150 chunks)."""
    n = rows_alive.shape[0]
    chunks = -(-n // rows)
    padded = F.pad(rows_alive.bool(), (0, chunks * rows - n))
    return padded.view(chunks, rows).any(1).tolist()


def scaled(x: torch.Tensor, dtype: torch.dtype, temperature: float) -> torch.Tensor:
    """x / T in `dtype`: x itself (no copy) when it already is `dtype` and T = 1."""
    x = x.to(dtype)
    return x if temperature == 1 else x / temperature


def exp_shifted(x: torch.Tensor, shift: torch.Tensor, temperature: float, out: torch.Tensor) -> torch.Tensor:
    """out = exp(x / T − shift[:, None]) for rows x (n, V), in out's dtype when it is the compute dtype (no
    temporary), else through one float32 temporary copied into out."""
    dtype = shift.dtype
    work = out if out.dtype == dtype else torch.empty(out.shape, dtype=dtype, device=out.device)
    torch.sub(scaled(x, dtype, temperature), shift[:, None], out=work)
    work.exp_()
    if work is not out:
        out.copy_(work)
    return out


class _RowNLL(torch.autograd.Function):
    """Per row r of x (n, V): Σ_j w_rj · −log softmax(x_r / T)[ids_rj], computed chunk by chunk.

    Gradient written out: ∂/∂x_r = g_r · (W_r · softmax(x_r / T) − Σ_j w_rj·e_{ids_rj}) / T, W_r = Σ_j w_rj,
    three passes over each chunk, written straight into the gradient buffer. Kept for backward: x itself
    (the caller's logits, not a copy) and one log-normaliser per row; so at a 152k vocabulary the loss adds
    no (n, V) buffer but its gradient, like a fused cross-entropy. A chunk whose weights are all 0 is
    skipped (its rows give 0 and no gradient).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, temperature: float, rows: int):
        dtype = compute_dtype(x)
        lse = torch.zeros(x.shape[0], dtype=dtype, device=x.device)
        out = torch.zeros(x.shape[0], dtype=dtype, device=x.device)
        alive = live_chunks((w != 0).any(-1), rows)
        for c, s in enumerate(range(0, x.shape[0], rows)):
            if not alive[c]:
                continue
            ws = w[s : s + rows]
            u = scaled(x[s : s + rows], dtype, temperature)  # (rows, V): a copy only for bf16 or T != 1
            lse[s : s + rows] = u.logsumexp(-1)
            nll = lse[s : s + rows, None] - u.gather(-1, ids[s : s + rows])  # (rows, N)
            # where, not a product: a weight-0 entry at a −inf logit is 0, not 0·inf = NaN
            out[s : s + rows] = torch.where(ws != 0, ws * nll, 0.0).sum(-1)
        ctx.save_for_backward(x, ids, w, lse)
        ctx.temperature, ctx.rows, ctx.alive = temperature, rows, alive
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, ids, w, lse = ctx.saved_tensors
        T, rows = ctx.temperature, ctx.rows
        g = torch.zeros_like(x, memory_format=torch.contiguous_format)
        scale = grad / T  # (n,)
        for c, s in enumerate(range(0, x.shape[0], rows)):
            if not ctx.alive[c]:
                continue
            ws = w[s : s + rows]
            gs = exp_shifted(x[s : s + rows], lse[s : s + rows], T, g[s : s + rows])  # softmax(x / T)
            gs.mul_((ws.sum(-1) * scale[s : s + rows])[:, None].to(gs.dtype))
            gs.scatter_add_(-1, ids[s : s + rows], (-ws * scale[s : s + rows, None]).to(gs.dtype))
        return g, None, None, None, None


def nll_rows(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    temperature: float = 1.0,
    rows: int | None = None,
) -> torch.Tensor:
    """(n,) per row of logits x (n, V): Σ_j weights_rj · −log softmax(x_r / T)[ids_rj], ids and weights (n, N).

    Cross-entropy is N = 1 with weight 1 on counted rows and 0 elsewhere; sampled soft labels are the drawn
    ids with their weights. Computed in float32 (float64 stays) chunk by chunk (`chunk_rows`), in the
    graph of x, without a float32 copy of x.
    """
    w = weights.to(compute_dtype(x))
    return _RowNLL.apply(x, ids.long(), w, temperature, rows or chunk_rows(x.shape[-1]))


def nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL of logits (B, T, V) against labels (B, T), and the number of counted tokens.

    Computed in fp32 whatever the logits' dtype, in row chunks (`nll_rows`): no float32 copy of
    the logits; a batch with no counted token gives (0, 0), not NaN.
    """
    targets = shifted_labels(labels).reshape(-1, 1)  # (B*T, 1)
    counted = targets != IGNORE_INDEX
    x = logits.reshape(-1, logits.shape[-1])  # (B*T, V): a view, also of a vocabulary-cut logits[..., :V]
    return nll_rows(x, targets.clamp(min=0), counted).sum(), counted.sum()


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


@dataclass
class HeadLoss:
    """A loss the model's head computes from the last hidden state, chunk by chunk (model/head.py), instead
    of returning logits: ``model(input_ids=..., head_loss=HeadLoss(fn, live))`` returns (Σ over row chunks
    of fn, the last hidden state (B, T, H)).

    fn(logits, rows): logits (n, V) of the rows `rows` (a slice of the flattened B·T positions), already cut
        to the tokenizer's ids -> a tensor of one shape for every chunk (per-term sums, per-sequence sums).
        It must depend on the logits only through those rows: backward calls it again on the same rows.
    live: (B·T,) bool, the rows that count for anything; chunks without one are skipped.
    observe(logits, rows): called once per chunk in forward, without gradient (training metrics, the
        soft-label stage's fidelity rows).
    slices: the row chunks themselves, in the order fn sees them (then `live` is not read), for a caller
        whose results depend on where chunks start: the teacher side's encoders (data_pipeline/encodings.py,
        `encode_head`) take a record's positions in the runs `Encoding.per_record` takes them in. None: the
        head's own even chunks of chunk_rows(V) rows.
    weights: for an fn of several values (terms), the direction backward is expected to weigh them along
        (the loop's term weights, when their counts are equal): the head then takes their gradients in
        forward along it, as for one value, and backward only scales them when its grad_output is along it
        (else it makes each chunk again, as without weights). None: no expectation.
    """

    fn: Callable[[torch.Tensor, slice], torch.Tensor]
    live: torch.Tensor | None = None
    observe: Callable[[torch.Tensor, slice], None] | None = None
    slices: list[slice] | None = None
    weights: tuple[float, ...] | None = None


def next_token_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """labels (B, T) -> (targets (B·T, 1) ids, counted (B·T,) bool) of the flattened positions: what
    `nll_rows` takes for cross-entropy, on any slice of rows."""
    targets = shifted_labels(labels).reshape(-1, 1)
    counted = targets[:, 0] != IGNORE_INDEX
    return targets.clamp(min=0), counted


def ce_fn(labels: torch.Tensor) -> tuple[Callable[[torch.Tensor, slice], torch.Tensor], torch.Tensor]:
    """(fn, counted rows) of the summed next-token cross-entropy against labels (B, T), for a HeadLoss."""
    targets, counted = next_token_rows(labels)

    def fn(z: torch.Tensor, s: slice) -> torch.Tensor:
        return nll_rows(z, targets[s], counted[s, None], rows=max(1, z.shape[0])).sum()

    return fn, counted


def lm_loss(model: torch.nn.Module, batch: dict) -> Loss:
    """Next-token cross-entropy (term "lm"): the teacher's loss and every stage's eval loss, from the last
    hidden state chunk by chunk (the head cuts a padded vocabulary's rows: model/head.py)."""
    fn, counted = ce_fn(batch["labels"])
    total, _ = model(input_ids=batch["input_ids"], head_loss=HeadLoss(fn, counted))
    return Loss({"lm": total})
