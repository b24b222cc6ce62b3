"""KD divergences (objectives/kd.py) against a naive float64 reference written with Python loops.

The reference below re-derives everything from objectives/kd.py's conventions: position t of the logits
predicts labels[t + 1]; a top-k teacher is compared on k+1 bins (the ids + a tail bin); every divergence
is multiplied by T²; a KL term whose left side has zero mass is 0, and one whose right side has zero
mass is dropped (instead of +inf).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stablekd.objectives.agreement import agreement_sums
from stablekd.objectives.divergences import FP16_FLOOR, teacher_topk_bins
from stablekd.objectives.kd import KINDS, distill_loss, kd_sum

B, T, V, K = 2, 6, 11, 4
TEMP = 2.0
BETA = 0.3
SKEW = 0.25
DIVERGENCES = ("fkl", "rkl", "gjsd", "tvd", "skl")  # every kind that also takes top-k soft labels


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These tensors are tiny: with 2 intra-op threads on a loaded 2-core machine each log_softmax
    # waits ~4 ms for the thread pool (measured), 1000× the work. Restored for the other test files.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# Naive reference: Python floats, explicit loops over tokens and bins.


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    es = [math.exp(x - m) for x in xs]
    z = sum(es)
    return [e / z for e in es]


def _ref_kl(a: list[float], b: list[float]) -> float:
    total = 0.0
    for ai, bi in zip(a, b, strict=True):
        if ai > 0 and bi > 0:  # 0·log 0 = 0; a zero right side is dropped, not +inf
            total += ai * math.log(ai / bi)
    return total


def _ref_divergence(p: list[float], q: list[float], kind: str, beta: float, skew: float) -> float:
    if kind == "fkl":
        return _ref_kl(p, q)
    if kind == "rkl":
        return _ref_kl(q, p)
    if kind == "gjsd":
        if beta == 0:
            return _ref_kl(p, q)
        if beta == 1:
            return _ref_kl(q, p)
        m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q, strict=True)]
        return beta * _ref_kl(p, m) + (1 - beta) * _ref_kl(q, m)
    if kind == "tvd":
        return 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q, strict=True))
    if kind == "skl":
        m = [skew * pi + (1 - skew) * qi for pi, qi in zip(p, q, strict=True)]
        return _ref_kl(p, m)
    raise AssertionError(kind)


def _ref_kd_sum(student, teacher, labels, kind, temp, beta=BETA, skew=SKEW) -> tuple[float, int]:
    s = student.double().tolist()
    lab = labels.tolist()
    full = isinstance(teacher, torch.Tensor)
    if full:
        t = teacher.double().tolist()
    else:
        ids, lps = teacher[0].tolist(), teacher[1].double().tolist()
    total, count = 0.0, 0
    for b in range(len(s)):
        for pos in range(len(s[b])):
            if pos + 1 >= len(s[b]) or lab[b][pos + 1] == -100:
                continue  # the last position predicts nothing; -100 counts for nothing
            count += 1
            if kind == "mse":
                diffs = [(x / temp - y / temp) ** 2 for x, y in zip(s[b][pos], t[b][pos], strict=True)]
                total += temp**2 * sum(diffs) / len(diffs)
                continue
            q_all = _softmax([x / temp for x in s[b][pos]])
            if full:
                p = _softmax([x / temp for x in t[b][pos]])
                q = q_all
            else:
                p = [math.exp(lp) for lp in lps[b][pos]]  # exp(-65504) == 0.0
                p.append(max(0.0, 1.0 - sum(p)))
                q = [q_all[i] for i in ids[b][pos]]
                q.append(sum(q_all[i] for i in range(len(q_all)) if i not in ids[b][pos]))
            total += temp**2 * _ref_divergence(p, q, kind, beta, skew)
    return total, count


# --------------------------------------------------------------------------------------------------
# Inputs


def _labels(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 1] = -100  # -> position 0 of row 0 is not counted
    labels[1, 3:5] = -100  # -> positions 2, 3 of row 1 are not counted
    return labels  # counted: row 0 positions 1..4, row 1 positions 0, 1, 4 -> 7 tokens


def _inputs(dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)).to(dtype)
    teacher = (3 * torch.randn(B, T, V, generator=g, dtype=torch.float64)).to(dtype)
    return student, teacher, _labels(seed)


def _topk(teacher: torch.Tensor, k: int, temp: float = TEMP, ids_dtype=torch.int64, lp_dtype=None):
    logprobs = F.log_softmax(teacher.double() / temp, dim=-1)
    values, ids = logprobs.topk(k, dim=-1)  # sorted descending
    return ids.to(ids_dtype), values.to(lp_dtype or teacher.dtype)


def test_reference_self_check():
    # The reference itself on a two-bin case worked by hand: p = (0.5, 0.5), q = (0.25, 0.75).
    p, q = [0.5, 0.5], [0.25, 0.75]
    assert _ref_divergence(p, q, "fkl", 0, 0) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert _ref_divergence(p, q, "rkl", 0, 0) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    assert _ref_divergence(p, q, "tvd", 0, 0) == pytest.approx(0.25)
    assert _ref_divergence(p, q, "skl", 0, 1.0) == 0.0
    assert _labels().ne(-100)[:, 1:].sum() == 7


# --------------------------------------------------------------------------------------------------
# Values against the reference


@pytest.mark.parametrize(
    "dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-10), (torch.bfloat16, 1e-5)]
)
@pytest.mark.parametrize("kind", KINDS)
def test_full_logits_match_reference(kind, dtype, rtol):
    student, teacher, labels = _inputs(dtype)
    loss, tokens = kd_sum(student, teacher, labels, kind, TEMP, beta=BETA, skew=SKEW)
    want, count = _ref_kd_sum(student, teacher, labels, kind, TEMP)
    assert tokens.item() == count == 7
    # bf16 inputs are computed in fp32 (the reference sees the same bf16 values, exactly, in float64)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.item() == pytest.approx(want, rel=rtol)


@pytest.mark.parametrize(
    "ids_dtype, lp_dtype",
    # int32/float64, and the shard format (docs/architecture.md, Soft labels): uint16 ids, float16 log-probs
    [(torch.int64, torch.float32), (torch.int32, torch.float64), (torch.uint16, torch.float16)],
)
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_topk_match_reference(kind, ids_dtype, lp_dtype):
    student, teacher, labels = _inputs(torch.float64 if lp_dtype == torch.float64 else torch.float32)
    topk = _topk(teacher, K, ids_dtype=ids_dtype, lp_dtype=lp_dtype)
    loss, tokens = kd_sum(student, topk, labels, kind, TEMP, beta=BETA, skew=SKEW)
    want, count = _ref_kd_sum(student, topk, labels, kind, TEMP)
    assert tokens.item() == count == 7
    assert loss.item() == pytest.approx(want, rel=1e-10 if lp_dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_topk_with_k_equal_v_is_the_full_loss(kind):
    student, teacher, labels = _inputs(torch.float64)
    s_full = student.clone().requires_grad_()
    s_topk = student.clone().requires_grad_()
    full, _ = kd_sum(s_full, teacher, labels, kind, TEMP, beta=BETA, skew=SKEW)
    topk, _ = kd_sum(s_topk, _topk(teacher, V), labels, kind, TEMP, beta=BETA, skew=SKEW)
    assert topk.item() == pytest.approx(full.item(), rel=1e-10)
    # the empty tail bin (−inf on both sides) must not put NaN into the gradient either
    full.backward()
    topk.backward()
    assert torch.isfinite(s_topk.grad).all()
    torch.testing.assert_close(s_topk.grad, s_full.grad, rtol=1e-9, atol=1e-12)


def test_topk_is_not_the_full_loss_when_k_is_small():
    # Guard for the test above: with k < V the k+1-bin loss must differ from the full one.
    student, teacher, labels = _inputs(torch.float64)
    full, _ = kd_sum(student, teacher, labels, "fkl", TEMP)
    topk, _ = kd_sum(student, _topk(teacher, 2), labels, "fkl", TEMP)
    assert abs(topk.item() - full.item()) > 1e-3


@pytest.mark.parametrize("teacher_kind", ["full", "topk"])
def test_gjsd_endpoints_are_forward_and_reverse_kl(teacher_kind):
    student, teacher, labels = _inputs(torch.float64)
    t = teacher if teacher_kind == "full" else _topk(teacher, K)
    fkl, _ = kd_sum(student, t, labels, "fkl", TEMP)
    rkl, _ = kd_sum(student, t, labels, "rkl", TEMP)
    assert abs(fkl.item() - rkl.item()) > 1e-3  # the two directions really differ on these inputs
    assert kd_sum(student, t, labels, "gjsd", TEMP, beta=0.0)[0].item() == pytest.approx(
        fkl.item(), rel=1e-12
    )
    assert kd_sum(student, t, labels, "gjsd", TEMP, beta=1.0)[0].item() == pytest.approx(
        rkl.item(), rel=1e-12
    )


def test_forward_kl_gradient_written_out_matches_the_traced_one():
    """kind fkl on top-k takes its gradient from a formula (TopkForwardKL); gjsd with beta 0 is the same
    divergence traced by autograd. Rows with padding (topp: fewer entries, the first id repeated, log-probs
    at the float16 floor), a teacher whose top-k hold all its mass (dead tail bin) and a floor entry."""
    student, teacher, labels = _inputs(torch.float64)
    ids, lp = _topk(teacher, K)
    ids[0, 1, 2:], lp[0, 1, 2:] = ids[0, 1, 0], FP16_FLOOR  # two entries, then padding
    lp[1, 1] = lp[1, 1] - lp[1, 1].logsumexp(-1) + 1e-12  # the top-k hold all the mass: no tail
    assert teacher_topk_bins(lp[1, 1][None])[0, -1] == float("-inf")
    lp[0, 3, -1] = FP16_FLOOR  # an entry the teacher rules out
    grads = []
    for kind in ("fkl", "gjsd"):
        s = student.clone().requires_grad_()
        loss, _ = kd_sum(s, (ids, lp), labels, kind, TEMP, beta=0.0)
        loss.backward()
        grads.append((loss.detach(), s.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-12, atol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-9, atol=1e-12)
    assert grads[0][1].abs().sum() > 0

    # float32, a student sure of the teacher's top-k: its tail mass e^-150 underflows, yet the teacher
    # puts mass there (the gradient must pull it back, finite and as the traced one says).
    sure = torch.zeros(B, T, V).scatter_(-1, ids, 150.0)
    grads = []
    for kind in ("fkl", "gjsd"):
        s = sure.clone().requires_grad_()
        loss, _ = kd_sum(s, (ids, lp.float()), labels, kind, 1.0, beta=0.0)
        loss.backward()
        grads.append(s.grad)
    assert torch.isfinite(grads[0]).all()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_temperature_scaling_is_t_squared():
    # At T=1 the T² factor is 1; the reference's value at T=1 must match without any factor.
    student, teacher, labels = _inputs(torch.float64)
    want, _ = _ref_kd_sum(student, teacher, labels, "fkl", 1.0)
    assert kd_sum(student, teacher, labels, "fkl", 1.0)[0].item() == pytest.approx(want, rel=1e-10)
    # mse: T² cancels the 1/T² exactly
    a = kd_sum(student, teacher, labels, "mse", 1.0)[0].item()
    assert kd_sum(student, teacher, labels, "mse", 3.0)[0].item() == pytest.approx(a, rel=1e-12)


# --------------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize(
    "kind, teacher_kind", [(k, "full") for k in KINDS] + [(k, "topk") for k in DIVERGENCES]
)
def test_gradcheck(kind, teacher_kind):
    g = torch.Generator().manual_seed(1)
    student = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = 2 * torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([[1, 2, -100], [3, 4, 0]])
    t = teacher if teacher_kind == "full" else _topk(teacher, 2, temp=1.5)

    def fn(s):
        return kd_sum(s, t, labels, kind, 1.5, beta=BETA, skew=SKEW, chunk_tokens=2)[0]

    assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kind, teacher_kind", [("fkl", "full"), ("mse", "full"), ("fkl", "topk"), ("gjsd", "topk")]
)
def test_chunking_gives_the_same_value_and_gradient(kind, teacher_kind):
    student, teacher, labels = _inputs(torch.float64)
    t = teacher if teacher_kind == "full" else _topk(teacher, K)
    results = []
    for chunk in (3, 4096):  # 7 counted tokens -> chunks of 3, 3, 1 vs one chunk
        s = student.clone().requires_grad_()
        loss, _ = kd_sum(s, t, labels, kind, TEMP, beta=BETA, chunk_tokens=chunk)
        loss.backward()
        results.append((loss.detach(), s.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-12, atol=1e-15)


def test_masked_positions_get_no_gradient_and_do_not_matter():
    student, teacher, labels = _inputs(torch.float64)
    s = student.clone().requires_grad_()
    loss, _ = kd_sum(s, teacher, labels, "fkl", TEMP)
    loss.backward()
    uncounted = [(0, 0), (1, 2), (1, 3), (0, T - 1), (1, T - 1)]
    for b, pos in uncounted:
        assert s.grad[b, pos].abs().max() == 0
    assert s.grad[0, 1].abs().max() > 0  # a counted position does get a gradient
    moved = student.clone()
    for b, pos in uncounted:
        moved[b, pos] += 100.0
    assert kd_sum(moved, teacher, labels, "fkl", TEMP)[0].item() == pytest.approx(loss.item(), rel=1e-12)


# --------------------------------------------------------------------------------------------------
# Edge cases


@pytest.mark.parametrize("teacher_kind", ["full", "topk"])
def test_all_masked_batch_is_zero_and_backpropagates(teacher_kind):
    student, teacher, _ = _inputs()
    labels = torch.full((B, T), -100)
    labels[:, 0] = 5  # a label at position 0 is predicted by nothing, so still no counted token
    t = teacher if teacher_kind == "full" else _topk(teacher, K)
    for kind in DIVERGENCES:
        s = student.clone().requires_grad_()
        loss, tokens = kd_sum(s, t, labels, kind, TEMP)
        assert loss.item() == 0.0 and tokens.item() == 0
        loss.backward()
        assert torch.equal(s.grad, torch.zeros_like(s.grad))
        for alpha in (1.0, 0.5, 0.0):
            s = student.clone().requires_grad_()
            mean = distill_loss(s, t, labels, kind, TEMP, alpha=alpha)
            assert mean.item() == 0.0
            mean.backward()
            assert torch.equal(s.grad, torch.zeros_like(s.grad))


@pytest.mark.parametrize("teacher_kind", ["full", "topk"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_distill_loss_mixes_kd_and_ce(alpha, teacher_kind):
    student, teacher, labels = _inputs(torch.float64)
    t = teacher if teacher_kind == "full" else _topk(teacher, K)
    kd, count = _ref_kd_sum(student, t, labels, "gjsd", TEMP)
    # CE written out directly: logits at t score labels[t + 1], -100 ignored, mean over counted tokens
    ce = F.cross_entropy(
        student[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="mean"
    ).item()
    got = distill_loss(student, t, labels, "gjsd", TEMP, beta=BETA, alpha=alpha, skew=SKEW)
    assert got.item() == pytest.approx(alpha * kd / count + (1 - alpha) * ce, rel=1e-6)


def test_fp16_topk_with_floor_entries_is_finite():
    student, teacher, labels = _inputs()
    ids, logprobs = _topk(teacher, K, lp_dtype=torch.float16)
    floor = torch.finfo(torch.float16).min
    assert floor == -65504.0
    logprobs[0, :, 2:] = floor  # storage's "−inf": these bins have zero teacher probability
    logprobs[1, 4, :] = floor  # a token whose every stored id has zero probability (all mass in the tail)
    logprobs[1, 1, 0] = 0.0  # rounding gives Σ p > 1: the tail clamps to 0 (reverse KL would be +inf)
    for kind in DIVERGENCES:
        s = student.clone().requires_grad_()
        loss, _ = kd_sum(s, (ids, logprobs), labels, kind, TEMP, beta=BETA, skew=SKEW)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all(), kind
        want, _ = _ref_kd_sum(student, (ids, logprobs), labels, kind, TEMP)
        assert loss.item() == pytest.approx(want, rel=1e-5), kind


@pytest.mark.parametrize("student_masked", [False, True])
def test_full_logits_with_minus_inf_are_finite(student_masked):
    # A teacher (and maybe the student too) that masks part of the vocabulary, e.g. padded rows, with -inf.
    student, teacher, labels = _inputs(torch.float64)
    teacher[..., -3:] = float("-inf")
    if student_masked:
        student[..., -3:] = float("-inf")
    for kind in DIVERGENCES:
        s = student.clone().requires_grad_()
        loss, _ = kd_sum(s, teacher, labels, kind, TEMP, beta=BETA, skew=SKEW)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all(), kind
        want, _ = _ref_kd_sum(student, teacher, labels, kind, TEMP)
        assert loss.item() == pytest.approx(want, rel=1e-10), kind


# --------------------------------------------------------------------------------------------------
# Agreement metrics


def test_agreement_sums_hand_built():
    # One row, 4 positions, V = 4. Counted: positions 1 and 2 (labels[2], labels[3] are real);
    # position 0 predicts labels[1] = -100 and position 3 predicts nothing.
    probs = torch.tensor(
        [
            [0.97, 0.01, 0.01, 0.01],  # pos 0: not counted (would add mass ~0.98 and one agreement)
            [0.50, 0.25, 0.125, 0.125],  # pos 1: ids (0, 2) -> mass 0.625, argmax 0 == 0 -> agrees
            [0.10, 0.20, 0.30, 0.40],  # pos 2: ids (1, 2) -> mass 0.5, argmax 3 != 1 -> disagrees
            [0.01, 0.97, 0.01, 0.01],  # pos 3: not counted
        ]
    )
    logits = (probs.log() + 7.0).unsqueeze(0)  # a constant shift leaves the softmax unchanged
    topk_ids = torch.tensor([[[0, 1], [0, 2], [1, 2], [1, 0]]], dtype=torch.int32)
    labels = torch.tensor([[3, -100, 1, 2]])
    for chunk in (1, 2048):
        got = agreement_sums(logits, topk_ids, labels, chunk_tokens=chunk)
        assert got["student_topk_mass"].item() == pytest.approx(1.125, rel=1e-6)
        assert got["top1_agreement"].item() == 1
        assert got["tokens"].item() == 2
    # max_tokens=1 measures the first counted position only (every ceil(2 / 1) = 2nd row from the first)
    got = agreement_sums(logits, topk_ids, labels, max_tokens=1)
    assert got["student_topk_mass"].item() == pytest.approx(0.625, rel=1e-6)
    assert got["top1_agreement"].item() == 1 and got["tokens"].item() == 1


def test_checkpointed_chunks_give_the_same_loss_and_gradient(monkeypatch):
    # Small chunks are not checkpointed (CHECKPOINT_ELEMENTS); forcing every chunk under checkpointing
    # must not change the loss or the gradient.
    import stablekd.objectives.kd as distill_mod

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, dtype=torch.float64)
    t_logits = torch.randn(2, 6, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, 3] = -100
    out = {}
    for threshold in (distill_mod.CHECKPOINT_ELEMENTS, 1):
        monkeypatch.setattr(distill_mod, "CHECKPOINT_ELEMENTS", threshold)
        x = logits.clone().requires_grad_()
        loss, _ = kd_sum(x, t_logits, labels, "gjsd", 2.0, chunk_tokens=3)
        loss.backward()
        out[threshold] = (loss.detach(), x.grad)
    (l1, g1), (l2, g2) = out.values()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g1, g2)


# --------------------------------------------------------------------------------------------------
# Validation


def test_bad_arguments_raise_useful_errors():
    student, teacher, labels = _inputs()
    topk = _topk(teacher, K)
    with pytest.raises(ValueError, match=r"'kl'.*fkl.*rkl.*gjsd.*tvd.*skl.*mse"):
        kd_sum(student, teacher, labels, "kl")
    with pytest.raises(ValueError, match="'kl'"):
        distill_loss(student, teacher, labels, "kl")
    with pytest.raises(ValueError, match="mse.*full teacher logits"):
        kd_sum(student, topk, labels, "mse")
    for temp in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            kd_sum(student, teacher, labels, "fkl", temperature=temp)
        with pytest.raises(ValueError, match="temperature"):
            distill_loss(student, teacher, labels, "fkl", temperature=temp)
    with pytest.raises(ValueError, match="alpha"):
        distill_loss(student, teacher, labels, alpha=1.5)
    with pytest.raises(ValueError, match="beta"):
        distill_loss(student, teacher, labels, "gjsd", beta=-0.1)
    with pytest.raises(ValueError, match="skew"):
        kd_sum(student, teacher, labels, "skl", skew=2.0)
    with pytest.raises(ValueError, match=r"teacher logits: expected shape .*\(2, 6, 11\)"):
        kd_sum(student, teacher[:, :, :5], labels)
    with pytest.raises(ValueError, match=r"labels: expected shape .*\(2, 6\)"):
        kd_sum(student, teacher, labels[:, :3])
    with pytest.raises(ValueError, match="topk_logprobs: expected shape"):
        kd_sum(student, (topk[0], topk[1][..., :2]), labels)
    with pytest.raises(ValueError, match="topk_ids: expected an integer dtype"):
        kd_sum(student, (topk[0].float(), topk[1]), labels)
    with pytest.raises(ValueError, match="chunk_tokens"):
        kd_sum(student, teacher, labels, chunk_tokens=0)
