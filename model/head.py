"""The classifier head, in one place: the vocabulary cut and every loss computed from the last hidden state
chunk by chunk, so no (B·T, V) logits and no gradient of that size ever exist (docs/architecture.md, Loss
conventions).

`install_head(model, vocab)` is called where models are built and loaded (model/build.py). It changes no
parameter, buffer or config (an export is byte for byte what it was) and gives the model two behaviours:

- ``model(...)`` as before, with the logits cut to the tokenizer's `vocab` ids: a padded vocabulary's rows
  (released checkpoints pad: Qwen2.5-7B has 152,064 rows for 151,665 ids) are never generated, scored or
  stored, and no caller passes a vocabulary size.
- ``model(input_ids=..., head_loss=HeadLoss(fn))`` (objectives/lm.py) runs the trunk only (the base model: its last hidden
  state, after the final norm, is what the head reads) and then the head on it, which returns
  ``(Σ over row chunks of fn(logits_chunk, rows), last_hidden_state)``. A chunk's logits are the head's
  matmul, bias and the architecture's final logit transform (`logit_transform`) on chunk_rows(V) rows
  (~64 MiB of float32 per chunk at any V); backward recomputes each chunk's logits, differentiates `fn` on
  them and writes the chunk's gradients w.r.t. the hidden rows and the head's weight and bias straight into
  their buffers. Peak memory is O(chunk × V + B·T × H + V × H) whatever the loss: CE, every KD kind and
  encoding, cross-tokenizer, on-policy and the contrastive likelihood scorer all go through here.

ZeRO-3: the work is done inside the head module's own forward, so DeepSpeed's module hooks gather its
partitioned weight once for the forward (and once for the backward, as for any layer), never per chunk, and
the weight's gradient reaches DeepSpeed's partitioned reduction through ordinary autograd. Called through
the model (and so through the DeepSpeed engine), the engine's forward and backward bookkeeping run as usual.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import MethodType

import torch
import torch.nn.functional as F

from stablekd.objectives.lm import HeadLoss, chunk_rows, live_chunks


def logit_transform(config) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the architecture's causal-LM forward applies to the head's output before returning logits:
    Gemma 2/3's final soft-cap (cap · tanh(x / cap)), Cohere's logit_scale, Granite's logits_scaling; None
    for the others (Llama, Qwen2, Mistral, Phi, GPT-2: the head's output is the logits)."""
    c = config.get_text_config()
    cap = getattr(c, "final_logit_softcapping", None)
    if cap:
        return lambda x: torch.tanh(x / cap) * cap
    if getattr(c, "model_type", "") == "cohere":
        scale = c.logit_scale
        return lambda x: x * scale
    if getattr(c, "model_type", "") == "granite":
        div = c.logits_scaling
        return lambda x: x / div
    return None


def full_logits(head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """The head's plain output cut to its vocabulary: the path of generation and of callers that want logits
    (the architecture's forward applies its transform after it). No training loss calls it."""
    V = head.vocab
    return F.linear(hidden, head.weight[:V], None if head.bias is None else head.bias[:V])


def _chunk_logits(
    h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transform
) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw, transformed) logits of hidden rows h (n, H) against w (V, H), b (V,)."""
    raw = F.linear(h, w, b)
    return raw, raw if transform is None else transform(raw)


def _chunks(n: int, rows: int, live: torch.Tensor | None) -> list[slice]:
    alive = live_chunks(live, rows) if live is not None else [True] * -(-n // rows)
    return [slice(s, s + rows) for c, s in enumerate(range(0, n, rows)) if alive[c]]


def _forward_chunks(h, w, b, transform, loss: HeadLoss, slices: list[slice]) -> torch.Tensor | None:
    total = None
    for s in slices:
        _, z = _chunk_logits(h[s], w, b, transform)
        if loss.observe is not None:
            loss.observe(z.detach(), s)
        part = loss.fn(z, s)
        total = part if total is None else total + part
    return total


class _ChunkedHead(torch.autograd.Function):
    """Σ over row chunks of loss.fn(logits of the chunk), from hidden h (N, H), weight w (V, H) (already cut
    to the vocabulary: a view) and bias b (V,) or None. Backward recomputes each chunk's logits, takes the
    gradient of ⟨grad_output, fn⟩ w.r.t. them (autograd on the chunk, so every loss's own backward,
    written-out or traced, is reused), and accumulates h's rows and w's and b's gradients from it."""

    @staticmethod
    def forward(ctx, h, w, b, transform, loss: HeadLoss, slices: list[slice]):
        ctx.save_for_backward(h, w, b)
        ctx.transform, ctx.loss, ctx.slices = transform, loss, slices
        return _forward_chunks(h, w, b, transform, loss, slices)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, w, b = ctx.saved_tensors
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        gh = torch.zeros_like(h)
        gw = torch.zeros(w.shape, dtype=acc, device=w.device) if ctx.needs_input_grad[1] else None
        gb = (
            torch.zeros(b.shape, dtype=acc, device=b.device)
            if b is not None and ctx.needs_input_grad[2]
            else None
        )
        for s in ctx.slices:
            hs = h[s]
            with torch.enable_grad():
                raw = F.linear(hs, w, b).detach().requires_grad_()
                z = raw if ctx.transform is None else ctx.transform(raw)
                (gz,) = torch.autograd.grad(ctx.loss.fn(z, s), raw, grad)  # (n, V)
            gh[s] = gz @ w
            if gw is not None:
                gw.addmm_(gz.t().to(acc), hs.to(acc))
            if gb is not None:
                gb += gz.sum(0).to(acc)
        return (
            gh,
            None if gw is None else gw.to(w.dtype),
            None if gb is None else gb.to(b.dtype),
            None, None, None,
        )  # fmt: skip


def chunked_loss(head: torch.nn.Linear, hidden: torch.Tensor, loss: HeadLoss) -> torch.Tensor:
    """Σ over chunks of loss.fn on the head's logits of `hidden` (..., H), never all of them at once."""
    V = head.vocab
    h = hidden.reshape(-1, hidden.shape[-1])
    w = head.weight[:V]
    b = None if head.bias is None else head.bias[:V]
    rows = head.rows or chunk_rows(V)
    # With no live row, one chunk anyway: fn's zeros, of its shape and in the graph (an all-masked
    # micro-batch still backwards through every parameter, as ZeRO's hooks expect).
    slices = _chunks(h.shape[0], rows, loss.live) or [slice(0, rows)]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, w, b)):
        return _ChunkedHead.apply(h, w, b, head.transform, loss, slices)
    return _forward_chunks(h, w, b, head.transform, loss, slices)


def _head_forward(self: torch.nn.Linear, hidden: torch.Tensor, loss: HeadLoss | None = None) -> torch.Tensor:
    """The installed head's forward: the cut logits, or with `loss` the chunked loss (chunked_loss)."""
    return full_logits(self, hidden) if loss is None else chunked_loss(self, hidden, loss)


def install_head(model: torch.nn.Module, vocab: int, rows: int | None = None) -> torch.nn.Module:
    """Give `model` (a Hugging Face causal LM whose output embedding is a Linear) the cut head and the
    ``head_loss`` path (module docstring); `rows`: rows per chunk (None: chunk_rows(vocab)). Idempotent."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(
            f"{type(model).__name__}: the output embedding is {type(head).__name__}, not a Linear"
        )
    weight_rows = getattr(head.weight, "ds_shape", head.weight.shape)[0]  # a ZeRO-3 partition's own is (0,)
    if weight_rows < vocab:
        raise ValueError(f"{type(model).__name__}: {weight_rows} head rows < tokenizer size {vocab}")
    head.vocab, head.rows, head.transform = vocab, rows, logit_transform(model.config)
    head.forward = MethodType(_head_forward, head)
    if getattr(model, "_head_installed", False):
        return model
    plain = model.forward

    @functools.wraps(plain)  # generate() reads the signature (logits_to_keep, attention_mask)
    def forward(*args, head_loss: HeadLoss | None = None, **kwargs):
        if head_loss is None:
            return plain(*args, **kwargs)
        out = model.base_model(*args, use_cache=False, **kwargs)
        hidden = out[0]  # (B, T, H): what the causal-LM forward hands its head
        return model.get_output_embeddings()(hidden, head_loss), hidden

    model.forward = forward
    model._head_installed = True
    return model


def vocab_of(model: torch.nn.Module) -> int:
    """The tokenizer size the installed head cuts to (a DeepSpeed engine's module is looked through)."""
    return getattr(model, "module", model).get_output_embeddings().vocab
