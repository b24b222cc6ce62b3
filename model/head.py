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
  (~64 MiB of float32 per chunk at any V); autograd on the chunk alone differentiates `fn` on them, and two
  matmuls write the chunk's gradients w.r.t. the hidden rows and the head's weight and bias straight into
  their buffers: in forward for a one-value loss or one of several values told their weights
  (`HeadLoss.weights`), in backward (the chunk made again) for the others. Peak memory is
  O(chunk × V + B·T × H + V × H) whatever the loss: CE, every KD kind and
  encoding, cross-tokenizer, on-policy and the contrastive likelihood scorer all go through here. So does
  the teacher side's soft-label encoding, without gradient: a HeadLoss whose fn encodes a chunk and returns
  0, in the encoder's own chunks (`HeadLoss.slices`; data_pipeline/encodings.py, `encode_head`). On-policy
  scoring makes the teacher's chunk beside the student's: the teacher's `last_hidden` and its head as
  `HeadRows`, called inside the student's chunk loop (objectives/kd_losses.py, `with_on_policy`).

ZeRO-3: the work is done inside the head module's own forward, so DeepSpeed's module hooks gather its
partitioned weight once for the forward (and once for the backward, as for any layer), never per chunk, and
the weight's gradient reaches DeepSpeed's partitioned reduction through ordinary autograd. Called through
the model (and so through the DeepSpeed engine), the engine's forward and backward bookkeeping run as usual.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
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


class _Grads:
    """Gradient buffers of h, w and b, filled chunk by chunk from a chunk's gradient w.r.t. its logits; w's
    and b's accumulated in float32 (float64 stays)."""

    def __init__(self, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, needs: tuple) -> None:
        self.acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        self.dtypes = (h.dtype, w.dtype, None if b is None else b.dtype)
        self.h = torch.zeros_like(h)
        self.w = torch.zeros(w.shape, dtype=self.acc, device=w.device) if needs[1] else None
        self.b = torch.zeros(b.shape, dtype=self.acc, device=b.device) if b is not None and needs[2] else None

    def add(self, s: slice, hs: torch.Tensor, w: torch.Tensor, gz: torch.Tensor) -> None:
        self.h[s] = gz @ w
        if self.w is not None:
            self.w.addmm_(gz.t().to(self.acc), hs.to(self.acc))
        if self.b is not None:
            self.b += gz.sum(0).to(self.acc)

    def result(self, scale: torch.Tensor | None = None) -> tuple:
        """(∂h, ∂w, ∂b) in the inputs' dtypes, times `scale` (a one-element grad_output) when given."""
        out = []
        for g, dtype in zip((self.h, self.w, self.b), self.dtypes, strict=True):
            if g is not None and scale is not None:
                g.mul_(scale.reshape(()).to(g.dtype))
            out.append(None if g is None else g.to(dtype))
        return tuple(out)


def _grad_of_chunk(h, w, b, transform, loss: HeadLoss, s: slice, grad_output=None, observe: bool = False):
    """(fn's value on chunk s, its gradient w.r.t. the chunk's raw logits weighted by grad_output): the
    chunk's logits made once, autograd through the transform and the loss only (not the matmul)."""
    with torch.enable_grad():
        raw = F.linear(h[s], w, b).detach().requires_grad_()
        z = raw if transform is None else transform(raw)
        if observe and loss.observe is not None:
            loss.observe(z.detach(), s)
        part = loss.fn(z, s)
        if isinstance(grad_output, tuple):  # HeadLoss.weights
            grad_output = torch.tensor(grad_output, dtype=part.dtype, device=part.device)
        if grad_output is None and part.numel() != 1:
            return part.detach(), None
        (gz,) = torch.autograd.grad(part, raw, grad_output)
    return part.detach(), gz


def _along(grad: torch.Tensor, direction: torch.Tensor) -> torch.Tensor | None:
    """r with grad = r · direction up to the rounding of the products that made grad (the loop's weight
    times its count's scale), or None: then the gradients taken in forward along `direction` are not it."""
    grad = grad.to(direction.dtype)
    r = (grad @ direction) / (direction @ direction)
    eps = torch.finfo(direction.dtype).eps
    return r if torch.allclose(grad, r * direction, rtol=8 * eps, atol=0) else None


class _ChunkedHead(torch.autograd.Function):
    """Σ over row chunks of loss.fn(logits of the chunk), from hidden h (N, H), weight w (V, H) (cut to the
    vocabulary) and bias b (V,) or None; the gradient of a chunk w.r.t. its logits comes from autograd on
    that chunk alone, so every loss's own backward (written out or traced) is reused, and gives h's rows
    and w's and b's gradients by two matmuls.

    A scalar loss (one term: CE, KD at alpha 1, on-policy) takes its gradients in forward, as a fused
    linear cross-entropy does, and backward only scales them: the logits are made once. So does a loss of
    several values with `HeadLoss.weights` (KD + CE: alpha and 1 − alpha), along those weights, when
    backward's grad_output is along them too. Otherwise (per-sequence scores, terms weighed by counts not
    known here) a loss of several values cannot be weighted before backward: forward computes the values
    and backward makes each chunk's logits again, weighted by grad_output.
    """

    @staticmethod
    def forward(ctx, h, w, b, transform, loss: HeadLoss, slices: list[slice]):
        total, grads = None, None
        for i, s in enumerate(slices):
            if i == 0 or grads is not None:
                part, gz = _grad_of_chunk(h, w, b, transform, loss, s, loss.weights, observe=True)
                if gz is not None:
                    grads = grads or _Grads(h, w, b, ctx.needs_input_grad)
                    grads.add(s, h[s], w, gz)
            else:
                _, z = _chunk_logits(h[s], w, b, transform)
                if loss.observe is not None:
                    loss.observe(z, s)
                part = loss.fn(z, s)
            total = part if total is None else total + part
        ctx.grads, ctx.applied, ctx.direction = grads, None, None
        if grads is None or loss.weights is not None:  # backward may have to make the chunks again
            ctx.save_for_backward(h, w, b)
            ctx.transform, ctx.loss, ctx.slices = transform, loss, slices
        if grads is not None and loss.weights is not None:
            ctx.direction = torch.tensor(loss.weights, dtype=total.dtype, device=total.device)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scale = None
        if ctx.grads is not None:
            scale = grad.reshape(()) if ctx.direction is None else _along(grad, ctx.direction)
        if scale is not None:
            if ctx.applied is None:  # scaled in place: no second (V, H) buffer
                ctx.applied = scale
                return (*ctx.grads.result(scale), None, None, None)
            # Another backward through the same graph (retain_graph): from the buffers scaled the first time.
            if ctx.applied == 0:
                raise RuntimeError("a second backward through a head loss first backpropagated with weight 0")
            ratio = scale / ctx.applied
            return (
                *(None if g is None else g * ratio.to(g.dtype) for g in ctx.grads.result()),
                None,
                None,
                None,
            )
        h, w, b = ctx.saved_tensors
        grads = _Grads(h, w, b, ctx.needs_input_grad)
        for s in ctx.slices:
            grads.add(s, h[s], w, _grad_of_chunk(h, w, b, ctx.transform, ctx.loss, s, grad)[1])
        return (*grads.result(), None, None, None)


def chunked_loss(head: torch.nn.Linear, hidden: torch.Tensor, loss: HeadLoss) -> torch.Tensor:
    """Σ over chunks of loss.fn on the head's logits of `hidden` (..., H), never all of them at once."""
    V = head.vocab
    h = hidden.reshape(-1, hidden.shape[-1])
    # The weight itself when nothing is cut: a slice's backward would allocate another (V, H) gradient.
    cut = V < head.weight.shape[0]
    w = head.weight[:V] if cut else head.weight
    b = head.bias[:V] if cut and head.bias is not None else head.bias
    rows = head.rows or chunk_rows(V)
    slices = loss.slices  # the caller's own chunks (the teacher side's encoders)
    if slices is None:
        # With no live row, one chunk anyway: fn's zeros, of its shape and in the graph (an all-masked
        # micro-batch still backwards through every parameter, as ZeRO's hooks expect).
        slices = _chunks(h.shape[0], rows, loss.live) or [slice(0, rows)]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, w, b)):
        return _ChunkedHead.apply(h, w, b, head.transform, loss, slices)
    return _forward_chunks(h, w, b, head.transform, loss, slices)


def _nothing(z: torch.Tensor, rows: slice) -> torch.Tensor:
    return z.new_zeros(())


def last_hidden(model: Callable[..., tuple], input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T, H): the last hidden state of `model` (an installed model or its DeepSpeed engine), the head's
    input, without a row of logits: the head runs on zero rows, so under ZeRO-3 the same parameters are
    gathered in the same order as in any head-path forward (DeepSpeed's prefetch trace stays valid). Without
    gradient: what another model's loss reads (on-policy scoring)."""
    with torch.no_grad():
        return model(input_ids=input_ids, head_loss=HeadLoss(_nothing, slices=[slice(0, 0)]))[1]


class HeadRows:
    """A head as a function of hidden rows: (n, H) -> its logits (n, V), cut to its vocabulary, with its
    bias and the architecture's logit transform (`_chunk_logits`, as `chunked_loss` makes a chunk), without
    gradient. For a loss that needs another model's logits chunk by chunk beside its own (on-policy: the
    teacher's, objectives/kd_losses.py `with_on_policy`), from that model's `last_hidden`.

    Use it as a context manager: `gather()` (ZeRO-3: deepspeed.zero.GatheredParameters of the head's
    parameters, a collective) is entered at the first call, so the weight is gathered once for all the
    chunks, and left with the context. A loss that calls it at least once per use (chunked_loss always
    runs a chunk) therefore gathers on every rank alike. Only the rows' logits ever exist."""

    def __init__(self, head: torch.nn.Linear, gather: Callable[[], AbstractContextManager] | None = None):
        self.head, self.gather = head, gather or nullcontext
        self.stack: ExitStack | None = None
        self.weights: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def __enter__(self) -> HeadRows:
        self.stack = ExitStack()
        return self

    def __exit__(self, *exc) -> None:
        stack, self.stack, self.weights = self.stack, None, None
        if stack is not None:
            stack.close()

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.stack is None:
            raise RuntimeError("HeadRows called outside its `with` block (its weight is not gathered there)")
        with torch.no_grad():  # a teacher's parameters may require grad (its engine has an optimizer)
            if self.weights is None:
                self.stack.enter_context(self.gather())
                head, V = self.head, self.head.vocab
                self.weights = (head.weight[:V], None if head.bias is None else head.bias[:V])
            return _chunk_logits(hidden, *self.weights, self.head.transform)[1]


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
