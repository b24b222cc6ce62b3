"""ULD and the hybrid loss (objectives/cross_tokenizer.py) against float64 references written here, one
position at a time, from the definitions in the module docstring."""

from __future__ import annotations

import math

import pytest
import torch

from stablekd.objectives.cross_tokenizer import cross_kd_sum, teacher_probs
from stablekd.objectives.kd import SampledLabels
from stablekd.objectives.kd_losses import cross_counts, cross_tokenizer_loss
from tests.fixed_model import fixed

VT, VS, K = 11, 9, 4


def _uld_reference(q: list[float], p: list[float]) -> float:
    """Σ_{j<r} |p_(j) − q_(j)| + |p_tail − q_tail| over the r nonzero teacher entries."""
    ps = sorted((x for x in p if x > 0), reverse=True)
    qs = sorted(q, reverse=True)[: len(ps)] + [0.0] * max(0, len(ps) - len(q))
    l1 = sum(abs(a - b) for a, b in zip(ps, qs, strict=True))
    return l1 + abs(max(0.0, 1 - sum(ps)) - max(0.0, 1 - sum(qs)))


def _kl(a: list[float], b: list[float]) -> float:
    return sum(x * (math.log(x) - math.log(y)) for x, y in zip(a, b, strict=True) if x > 0 and y > 0)


def _hybrid_reference(q: list[float], ids: list[int], p: list[float], vmap: list[int]) -> float:
    """Forward KL on (mapped entries, rest) + sorted L1 of the unmapped entries against the student's
    largest probabilities among ids no teacher id maps to."""
    mapped = [(vmap[i], x) for i, x in zip(ids, p, strict=True) if x > 0 and vmap[i] >= 0]
    pb = [x for _, x in mapped] + [max(0.0, 1 - sum(x for _, x in mapped))]
    qb = [q[s] for s, _ in mapped]
    qb.append(1 - sum(qb))
    kl = _kl(pb, qb)
    targets = {v for v in vmap if v >= 0}
    pu = sorted((x for i, x in zip(ids, p, strict=True) if x > 0 and vmap[i] < 0), reverse=True)
    qu = sorted((q[s] for s in range(len(q)) if s not in targets), reverse=True)[: len(pu)]
    qu += [0.0] * (len(pu) - len(qu))
    return kl + sum(abs(a - b) for a, b in zip(pu, qu, strict=True))


def _case(seed: int, sampled: bool = False):
    g = torch.Generator().manual_seed(seed)
    B, T = 2, 5
    logits = torch.randn(B, T, VS, generator=g, dtype=torch.float64) * 2
    ids = torch.stack([torch.randperm(VT, generator=g)[:K] for _ in range(B * T)]).reshape(B, T, K)
    raw = torch.randn(B, T, VT, generator=g, dtype=torch.float64).log_softmax(-1)
    lp = raw.gather(-1, ids).sort(-1, descending=True)
    ids = ids.gather(-1, lp.indices)
    lp = lp.values
    ids[0, 1, 3] = ids[0, 1, 0]  # top-p style padding: a repeat of the first id counts as absent
    aligned = torch.rand(B, T, generator=g) < 0.7
    aligned[0, 1] = True
    if sampled:
        w = torch.rand(B, T, K, generator=g, dtype=torch.float64) * 0.4
        w[1, 2, 2:] = 0  # sampled padding (ids unique per position, padding weight 0)
        w[0, 1, 3] = 0
        return logits, SampledLabels(ids, w), aligned
    return logits, (ids, lp), aligned


VMAP = torch.tensor([3, -1, 0, 5, -1, 8, 1, -1, -1, 2, 7])  # teacher id -> student id; student 4, 6 unmapped


@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("mode", ["uld", "hybrid"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_the_float64_reference(mode, temperature, sampled):
    logits, teacher, aligned = _case(0, sampled)
    total, n = cross_kd_sum(logits, teacher, aligned, mode, VMAP, "fkl", temperature, chunk_tokens=3)
    ids, p = teacher_probs(teacher)
    ref = 0.0
    for b, t in aligned.nonzero().tolist():
        q = (logits[b, t] / temperature).softmax(-1).tolist()
        pr = p[b, t].tolist()
        if mode == "uld":
            ref += _uld_reference(q, pr)
        else:
            ref += _hybrid_reference(q, ids[b, t].tolist(), pr, VMAP.tolist())
    assert int(n) == int(aligned.sum())
    assert total.dtype == torch.float64
    assert total.item() == pytest.approx(ref * temperature**2, rel=1e-9, abs=1e-12)


def test_hybrid_is_uld_where_the_next_token_differs():
    logits, teacher, aligned = _case(3)
    same = torch.rand(aligned.shape, generator=torch.Generator().manual_seed(5)) < 0.5
    total, _ = cross_kd_sum(logits, teacher, aligned, "hybrid", VMAP, same_next=same, chunk_tokens=2)
    ids, p = teacher_probs(teacher)
    ref = 0.0
    for b, t in aligned.nonzero().tolist():
        q = logits[b, t].softmax(-1).tolist()
        if same[b, t]:
            ref += _hybrid_reference(q, ids[b, t].tolist(), p[b, t].tolist(), VMAP.tolist())
        else:
            ref += _uld_reference(q, p[b, t].tolist())
    assert total.item() == pytest.approx(ref, rel=1e-9)


def test_padding_counts_as_absent():
    _, (ids, lp), _ = _case(0)
    _, p = teacher_probs((ids, lp))
    assert p[0, 1, 3] == 0 and p[0, 1, 0] > 0 and (p[1] > 0).all()


def test_uld_is_zero_for_a_permuted_copy_and_the_gradient_reaches_the_student():
    """ULD ignores which ids hold the mass: a student that puts the teacher's probabilities on other ids
    scores 0 (what makes it usable across vocabularies), and a different one gets a gradient."""
    p = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    logits = torch.full((1, 1, VS), -1e4, dtype=torch.float64)
    logits[0, 0, [7, 2, 5]] = p[:3].log()
    teacher = (torch.tensor([[[1, 4, 6, 1]]]), p.log().reshape(1, 1, 4))
    total, _ = cross_kd_sum(logits, teacher, torch.ones(1, 1, dtype=torch.bool), "uld")
    assert total.item() == pytest.approx(0.0, abs=1e-12)
    x = torch.randn(1, 1, VS, dtype=torch.float64, requires_grad=True)
    cross_kd_sum(x, teacher, torch.ones(1, 1, dtype=torch.bool), "uld")[0].backward()
    assert x.grad.abs().sum() > 0


def test_hybrid_gjsd_kind_and_all_unaligned_batch():
    logits, teacher, aligned = _case(1)
    logits.requires_grad_(True)
    a, _ = cross_kd_sum(logits, teacher, aligned, "hybrid", VMAP, "gjsd", beta=0.5)
    b, _ = cross_kd_sum(logits, teacher, aligned, "hybrid", VMAP, "fkl")
    assert torch.isfinite(a) and a.item() != pytest.approx(b.item())
    zero, n = cross_kd_sum(logits, teacher, torch.zeros_like(aligned), "hybrid", VMAP)
    zero.backward()
    assert zero.item() == 0 and int(n) == 0 and (logits.grad == 0).all()


def test_loop_loss_terms_counts_and_share():
    logits, (ids, lp), aligned = _case(2)

    labels = torch.randint(0, VS, (2, 5))
    labels[0, :2] = -100
    batch = {
        "input_ids": torch.zeros(2, 5, dtype=torch.long), "labels": labels, "aligned": aligned,
        "topk_ids": ids, "topk_logprobs": lp.float(), "teacher_positions": torch.tensor([4, 4]),
        "same_next": aligned,
    }  # fmt: skip
    out = cross_tokenizer_loss("hybrid", alpha=0.5, vmap=VMAP)(fixed(logits.float()), batch)
    assert set(out.sums) == {"kd", "ce"}
    assert out.metrics["aligned_share"] == (float(aligned.sum()), 8.0)
    assert cross_counts(batch) == {"kd": int(aligned.sum()), "ce": 7}  # shifted: 8 − the one at [0, 1]
    with pytest.raises(ValueError, match="needs vmap"):
        cross_kd_sum(logits, (ids, lp), aligned, "hybrid")


def _kl_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(a > 0, a * (a.clamp(min=1e-300).log() - b.log()), 0.0).sum()


def _position_reference(q: torch.Tensor, ids: list[int], p: torch.Tensor, mode: str, kind: str, beta: float):
    """One position's loss in float64 torch ops, written from the module docstring's definitions (the
    python references above, made differentiable in q): what the module's gradient is checked against."""
    real = [j for j in range(len(ids)) if p[j] > 0]
    vmap = VMAP.tolist()
    if mode == "uld":
        ps = p[real].sort(descending=True).values
        qs = q.sort(descending=True).values[: len(real)]
        return (ps - qs).abs().sum() + ((1 - ps.sum()).clamp(min=0) - (1 - qs.sum()).clamp(min=0)).abs()
    mapped = [j for j in real if vmap[ids[j]] >= 0]
    pb = torch.cat([p[mapped], (1 - p[mapped].sum()).clamp(min=0)[None]])
    qm = q[[vmap[ids[j]] for j in mapped]]
    qb = torch.cat([qm, (1 - qm.sum())[None]])
    if kind == "fkl":
        div = _kl_t(pb, qb)
    else:  # gjsd, TRL's generalized JSD: m = β·p + (1 − β)·q, β·KL(p‖m) + (1 − β)·KL(q‖m)
        m = beta * pb + (1 - beta) * qb
        div = beta * _kl_t(pb, m) + (1 - beta) * _kl_t(qb, m)
    targets = {v for v in vmap if v >= 0}
    pu = p[[j for j in real if vmap[ids[j]] < 0]].sort(descending=True).values
    qu = q[[s for s in range(len(q)) if s not in targets]].sort(descending=True).values[: len(pu)]
    qu = torch.cat([qu, qu.new_zeros(len(pu) - len(qu))])  # fewer unmapped student ids: their ranks hold 0
    return div + (pu - qu).abs().sum()


@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize(
    ("mode", "kind", "beta"), [("uld", "fkl", 0.5), ("hybrid", "fkl", 0.5), ("hybrid", "gjsd", 0.3)]
)
def test_gradients_match_the_float64_reference(mode, kind, beta, sampled):
    """The value and the gradient in the student's logits against a differentiable float64 reference
    (the value alone can be right with a wrong gradient: a detached tail or bin), then gradcheck of the
    module's own function against finite differences."""
    temperature = 2.0
    logits, teacher, aligned = _case(4, sampled)
    x = logits.clone().requires_grad_(True)
    total, _ = cross_kd_sum(x, teacher, aligned, mode, VMAP, kind, temperature, beta=beta, chunk_tokens=3)
    (grad,) = torch.autograd.grad(total, x)

    y = logits.clone().requires_grad_(True)
    ids, p = teacher_probs(teacher)
    ref = sum(
        _position_reference(
            (y[b, t] / temperature).softmax(-1), ids[b, t].tolist(), p[b, t], mode, kind, beta
        )
        for b, t in aligned.nonzero().tolist()
    )
    ref = ref * temperature**2
    (ref_grad,) = torch.autograd.grad(ref, y)
    assert total.item() == pytest.approx(ref.item(), rel=1e-9)
    assert grad[~aligned].abs().max() == 0 and ref_grad.abs().max() > 1e-3
    torch.testing.assert_close(grad, ref_grad, rtol=1e-7, atol=1e-10)

    def loss(z: torch.Tensor) -> torch.Tensor:
        return cross_kd_sum(z, teacher, aligned, mode, VMAP, kind, temperature, beta=beta, chunk_tokens=3)[0]

    assert torch.autograd.gradcheck(
        loss, (logits.clone().requires_grad_(True),), eps=1e-6, atol=1e-7, fast_mode=True
    )
