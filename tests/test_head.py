"""The head every built model has (model/head.py): losses from the last hidden state one chunk of logits at
a time, equal to the same losses on whole logits (float64, several architectures: untied, tied, biased,
soft-capped), gradchecked, and no training stage's loss or evaluation ever asks for whole logits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, GPT2Config, LlamaConfig, PhiConfig

from stablekd.model import head as head_module
from stablekd.model.head import HeadRows, chunked_loss, install_head, last_hidden
from stablekd.objectives.cross_tokenizer import cross_kd_sum
from stablekd.objectives.kd import SampledLabels, kd_rows, kd_sum
from stablekd.objectives.kd_losses import cross_tokenizer_loss, soft_label_loss, with_on_policy
from stablekd.objectives.lm import HeadLoss, ce_fn, lm_loss, nll_sum

V, ROWS, B, T, K = 52, 59, 2, 11, 4  # tokenizer ids, embedding rows (padded), batch, length, top-k
SMALL = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)


def _model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = {
        "llama": lambda: LlamaConfig(vocab_size=ROWS, tie_word_embeddings=False, **SMALL),
        "gpt2": lambda: GPT2Config(vocab_size=ROWS, n_embd=16, n_layer=1, n_head=2),  # tied head
        "phi": lambda: PhiConfig(vocab_size=ROWS, **SMALL),  # biased head
        "gemma2": lambda: Gemma2Config(  # final logit soft-cap, tied head
            vocab_size=ROWS, head_dim=8, num_key_value_heads=1, final_logit_softcapping=0.5, **SMALL
        ),
    }[arch]()
    model = AutoModelForCausalLM.from_config(config).double().eval()  # no dropout: two forwards compare
    if arch == "phi":  # a bias that matters
        torch.nn.init.normal_(model.lm_head.bias)
    return install_head(model, V, rows=3)  # chunks of 3 rows: several, the last one short


def _batch() -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, T), generator=gen)
    topk = torch.randint(0, V, (B, T, K), generator=gen)
    lp = torch.log_softmax(torch.randn(B, T, V, generator=gen, dtype=torch.float64), -1).gather(-1, topk)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :4] = 0  # a prompt: not learned
    return {"input_ids": ids, "topk_ids": topk, "topk_logprobs": lp, "loss_mask": mask}


def _grads(model: torch.nn.Module, total: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    total.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys()
    for n in ref:
        scale = ref[n].abs().max().clamp_min(1e-12)
        assert ((got[n] - ref[n]).abs().max() / scale) < 1e-5, n


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi", "gemma2"])
def test_every_loss_from_hidden_chunks_equals_it_on_whole_logits(arch):
    model = _model(arch)
    batch = _batch()
    ids = batch["input_ids"]
    labels = ids.masked_fill(batch["loss_mask"] == 0, -100)
    teacher = (batch["topk_ids"], batch["topk_logprobs"])
    sampled = {"sample_ids": batch["topk_ids"], "sample_weights": batch["topk_logprobs"].exp()}

    def whole() -> torch.Tensor:
        logits = model(input_ids=ids).logits  # the plain forward: cut to V, the soft-cap applied
        assert logits.shape == (B, T, V)
        return logits

    cases = [
        (
            "lm",
            lambda: lm_loss(model, {"input_ids": ids, "labels": labels}).sums["lm"],
            lambda: nll_sum(whole(), labels)[0],
        )
    ]
    for kind in ("fkl", "rkl", "gjsd", "tvd", "skl"):
        loss = soft_label_loss(kind, 2.0, beta=0.3, alpha=0.4)

        def ref(kind=kind):
            logits = whole()
            return 0.4 * kd_sum(logits, teacher, labels, kind, 2.0, 0.3)[0] + 0.6 * nll_sum(logits, labels)[0]

        def weighed(loss=loss):  # as the loop weighs the terms: along HeadLoss.weights, taken in forward
            sums = loss(model, batch).sums
            return 0.4 * sums["kd"] + 0.6 * sums["ce"]

        cases.append((kind, weighed, ref))
        if kind == "fkl":  # each term from a call of its own: not along the weights, backward remakes chunks
            cases.append((
                "fkl, terms apart",
                lambda loss=loss: 0.4 * loss(model, batch).sums["kd"] + 0.6 * loss(model, batch).sums["ce"],
                ref,
            ))  # fmt: skip
    sampled_batch = {"input_ids": ids, "loss_mask": batch["loss_mask"], **sampled}
    cases.append((
        "sampled",
        lambda: soft_label_loss("fkl", 1.5)(model, sampled_batch).sums["kd"],
        lambda: kd_sum(whole(), SampledLabels(sampled["sample_ids"], sampled["sample_weights"]), labels, "fkl", 1.5)[0],
    ))  # fmt: skip
    gen = torch.Generator().manual_seed(2)
    # On-policy: a teacher of the same architecture (its tie, bias, soft-cap and padded rows) scores chunk by
    # chunk from its last hidden state; the reference is its whole forward's logits.
    tmodel = _model(arch, seed=1)
    on = {"input_ids": ids, "labels": labels, "teacher_hidden": last_hidden(tmodel, ids),
          "teacher_head": HeadRows(tmodel.lm_head), "generate_s": 0.0, "teacher_s": 0.0}  # fmt: skip
    for kind in ("fkl", "gjsd", "mse"):
        cases.append((
            f"on-policy {kind}",
            lambda kind=kind: with_on_policy(soft_label_loss(), kind, 2.0, beta=0.3)(model, on).sums["on_policy_kd"],
            lambda kind=kind: kd_sum(whole(), tmodel(input_ids=ids).logits.detach(), labels, kind, 2.0, 0.3)[0],
        ))  # fmt: skip
    aligned = torch.rand(B, T, generator=gen) < 0.6
    same_next = aligned & (torch.rand(B, T, generator=gen) < 0.5)
    vmap = torch.randint(-1, V, (V + 5,), generator=gen)
    cross = {
        **batch,
        "labels": labels,
        "aligned": aligned,
        "same_next": same_next,
        "teacher_positions": torch.tensor([9, 9]),
    }
    for mode in ("uld", "hybrid"):
        loss = cross_tokenizer_loss(
            mode, "gjsd", 2.0, 0.3, alpha=0.5, vmap=vmap if mode == "hybrid" else None
        )

        def ref(mode=mode):
            logits = whole()
            kd = cross_kd_sum(logits, teacher, aligned, mode, vmap, "gjsd", 2.0, 0.3, same_next=same_next)[0]
            return kd + nll_sum(logits, labels)[0]

        cases.append((mode, lambda loss=loss: sum(loss(model, cross).sums.values()), ref))
    for name, got, ref in cases:
        g, r = got(), ref()
        assert torch.allclose(g, r, rtol=1e-10, atol=0), (arch, name, g, r)
        _close(_grads(model, g), _grads(model, r))
    assert all(p.grad is None for p in tmodel.parameters())  # the teacher's head is read, not trained


def test_gradcheck_of_the_chunked_head_with_bias_and_soft_cap():
    gen = torch.Generator().manual_seed(3)
    n, H, R, v = 7, 5, 9, 8  # rows, hidden, head rows (one padded), vocabulary
    h = torch.randn(n, H, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(R, H, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(R, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, v, (1, n), generator=gen)
    labels[0, 2] = -100
    ce, live = ce_fn(labels)
    topk = torch.randint(0, v, (n, 3), generator=gen)
    lp = torch.log_softmax(torch.randn(n, v, generator=gen, dtype=torch.float64), -1).gather(-1, topk)

    def loss(z, s):  # two terms: CE and a traced divergence on the top-k bins
        return torch.stack([ce(z, s), kd_rows(z, (topk[s], lp[s]), live[s], "gjsd", 1.5, 0.3, 0.1)])

    def f(h, w, b, fn=loss):
        head = SimpleNamespace(
            vocab=v, rows=3, transform=lambda x: torch.tanh(x / 2.0) * 2.0, weight=w, bias=b
        )
        return chunked_loss(head, h, HeadLoss(fn, live))

    def mixed(z, s):  # one value: its gradients are taken in forward; two: backward remakes the logits
        return loss(z, s) @ torch.tensor([0.3, 0.7], dtype=z.dtype)

    assert f(h, w, b).shape == (2,) and torch.autograd.gradcheck(f, (h, w, b))
    assert torch.autograd.gradcheck(lambda h, w, b: f(h, w, b, mixed), (h, w, b))

    # Two values with HeadLoss.weights (the loop's term weights): their gradients are taken in forward along
    # the weights; a backward along them only scales them (fn not called again), any other backward makes
    # the chunks again. Both give what the head without weights gives.
    calls = []

    def run(weights, out_grad):
        leaves = [t.detach().clone().requires_grad_() for t in (h, w, b)]
        head = SimpleNamespace(
            vocab=v, rows=3, transform=lambda x: torch.tanh(x / 2.0) * 2.0, weight=leaves[1], bias=leaves[2]
        )
        value = chunked_loss(
            head, leaves[0], HeadLoss(lambda z, s: calls.append(s) or loss(z, s), live, weights=weights)
        )
        calls.clear()
        value.backward(out_grad)
        return value, [t.grad for t in leaves], len(calls)

    along = torch.tensor([0.3, 0.7], dtype=torch.float64) * 2.5
    across = torch.tensor([1.0, -2.0], dtype=torch.float64)
    for out_grad, remade in ((along, False), (across, True), (along * 0, False)):
        want, want_grads, _ = run(None, out_grad)
        got, got_grads, calls_in_backward = run((0.3, 0.7), out_grad)
        assert torch.equal(got, want) and (calls_in_backward > 0) == remade
        for g, r in zip(got_grads, want_grads, strict=True):
            assert torch.allclose(g, r, rtol=1e-12, atol=1e-14)


def test_no_loss_and_no_evaluation_asks_for_whole_logits(monkeypatch):
    """The head's plain forward raises, as a head too big for memory would: every training stage's loss and
    the report's held-out scores still run, and backward reaches the head's weight."""
    from stablekd.evaluation.report import held_out_scores
    from stablekd.launcher.config import load_config
    from stablekd.launcher.stages import contrastive
    from tests.test_contrastive_stage import _groups

    def refuse(*_a, **_k):
        raise AssertionError("whole (B·T, V) logits asked for")

    model = _model("llama")
    monkeypatch.setattr(head_module, "full_logits", refuse)
    with pytest.raises(AssertionError, match="whole"):
        model(input_ids=torch.zeros(1, 3, dtype=torch.long))  # the patch can fail a test
    batch = _batch()
    labels = batch["input_ids"]
    tmodel = _model("gemma2", seed=1)  # the teacher's head too: tied, soft-capped, padded
    on = {"input_ids": labels, "labels": labels, "teacher_hidden": last_hidden(tmodel, labels),
          "teacher_head": HeadRows(tmodel.lm_head), "generate_s": 0.0, "teacher_s": 0.0}  # fmt: skip
    aligned = torch.ones(B, T, dtype=torch.bool)
    cross = {
        **batch,
        "labels": labels,
        "aligned": aligned,
        "same_next": aligned,
        "teacher_positions": torch.tensor([T, T]),
    }
    sampled = {
        "input_ids": labels,
        "sample_ids": batch["topk_ids"],
        "sample_weights": batch["topk_logprobs"].exp(),
    }
    runs = [
        lm_loss(model, {"input_ids": labels, "labels": labels}),  # teacher, every eval loss
        soft_label_loss("gjsd", 2.0, alpha=0.5)(model, batch),  # distill, top-k
        soft_label_loss()(model, sampled),  # distill, sampled
        cross_tokenizer_loss("hybrid", alpha=0.5, vmap=torch.arange(V))(model, cross),
        with_on_policy(soft_label_loss(), "fkl")(model, on),
    ]
    groups = _groups([1, 2, 1, 2])
    for lm in ("kd", "ce"):
        cfg = load_config(None, [f"contrastive.lm={lm}", "contrastive.negatives=2", "contrastive.margin=0.5"])
        lm_batch = {
            "lm_input_ids": labels,
            **(
                {"lm_labels": labels}
                if lm == "ce"
                else {"lm_topk_ids": batch["topk_ids"], "lm_topk_logprobs": batch["topk_logprobs"]}
            ),
        }
        runs.append(contrastive.make_loss(cfg)(model, {**groups, **lm_batch}))
    for out in runs:
        total = sum(out.sums.values())
        assert torch.isfinite(total)
        model.zero_grad()
        total.backward()
        assert (
            model.lm_head.weight.grad[:V].abs().sum() > 0 and model.lm_head.weight.grad[V:].abs().sum() == 0
        )
    ppl = held_out_scores(model, [{"input_ids": labels, "labels": labels}])
    assert ppl.tokens == B * (T - 1) and ppl.ppl > 1
