"""objectives/contrastive.py against naive references written with explicit loops, plus a real 2-rank gloo run.

The 2-rank test is the one that matters for training: rows split unevenly over ranks (3 and 5; 8 and 0), features
gathered with gradient, each rank's loss backpropagated, gradients all-reduced — must equal one process
computing the loss over the whole batch (float64, so any missing or doubled term shows far above 1e-9).
"""

from __future__ import annotations

import math
import socket
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from stablekd.objectives.contrastive import (
    ProjectionHead,
    continuation_logprob,
    embedding_scores,
    false_negative_mask,
    gather_with_grad,
    global_width,
    hardest_negatives,
    pool_continuation,
    simctg_sum,
    supcon_sum,
)

# --------------------------------------------------------------------------------------------------
# Naive references
# --------------------------------------------------------------------------------------------------


def ref_supcon(scores, positive, valid, tau):
    """Loops straight from the formula; returns (loss_sum, count, stats) as Python floats."""
    A, N = scores.shape
    loss, count = 0.0, 0
    st = dict(pos_sim=0.0, neg_sim=0.0, neg_anchors=0, acc1=0, anchors=0)
    for i in range(A):
        P = [a for a in range(N) if positive[i, a]]
        if not P:
            continue
        den = [a for a in range(N) if valid[i, a] or positive[i, a]]
        log_den = math.log(sum(math.exp(float(scores[i, a]) / tau) for a in den))
        loss += -sum(float(scores[i, p]) / tau - log_den for p in P) / len(P)
        count += 1
        negs = [a for a in den if not positive[i, a]]
        st["pos_sim"] += sum(float(scores[i, p]) for p in P) / len(P)
        if negs:
            st["neg_sim"] += sum(float(scores[i, a]) for a in negs) / len(negs)
            st["neg_anchors"] += 1
        best = max(den, key=lambda a: float(scores[i, a]))
        st["acc1"] += int(best in P)
        st["anchors"] += 1
    return loss, count, st


def random_problem(seed: int, groups: list[int]):
    """Rows in groups of the given sizes (a size-1 group = an anchor without positive), random scores."""
    g = torch.Generator().manual_seed(seed)
    gid = torch.cat([torch.full((n,), k) for k, n in enumerate(groups)])
    N = gid.numel()
    scores = torch.randn(N, N, generator=g, dtype=torch.float64) * 2
    eye = torch.eye(N, dtype=torch.bool)
    positive = (gid[:, None] == gid[None, :]) & ~eye
    valid = ~eye & (torch.rand(N, N, generator=g) > 0.2)  # some masked negatives
    return scores, positive, valid | positive, gid


def test_supcon_sum_matches_loop_reference():
    scores, positive, valid, _ = random_problem(0, [3, 2, 4, 1, 2])
    positive[0, 1] = False  # uneven |P(i)|
    for tau in (0.1, 0.7):
        loss, count, stats = supcon_sum(scores, positive, valid, tau)
        ref_loss, ref_count, ref_st = ref_supcon(scores, positive, valid, tau)
        assert loss.dtype == torch.float64
        assert int(count) == ref_count == 11  # 12 rows, the singleton group has no positive
        assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
        for k, v in ref_st.items():
            assert stats[k].item() == pytest.approx(v, rel=1e-12, abs=1e-12), k


def test_supcon_sum_anchor_without_negative_and_stats():
    # Anchor 0: candidates 1 (pos) and 2 (neg), argmax is the negative; anchor 1: only a positive.
    scores = torch.tensor([[0.0, 1.0, 3.0], [2.0, 0.0, 5.0]])
    positive = torch.tensor([[False, True, False], [True, False, False]])
    valid = torch.tensor([[False, True, True], [True, False, False]])
    loss, count, stats = supcon_sum(scores, positive, valid, tau=1.0)
    assert int(count) == 2
    # anchor 1 has a single-term denominator -> L = 0; anchor 0: -(1 - log(e + e^3))
    assert loss.item() == pytest.approx(math.log(math.e + math.e**3) - 1.0, rel=1e-6)
    assert stats["acc1"].item() == 1.0  # anchor 0 misses, anchor 1 hits
    assert stats["neg_anchors"].item() == 1.0
    assert stats["neg_sim"].item() == pytest.approx(3.0)
    assert stats["pos_sim"].item() == pytest.approx(3.0)  # 1 + 2


def test_supcon_sum_empty_and_no_positive():
    scores = torch.randn(3, 4, requires_grad=True)
    none = torch.zeros(3, 4, dtype=torch.bool)
    loss, count, stats = supcon_sum(scores, none, ~none, 0.5)
    assert loss.item() == 0.0 and int(count) == 0 and all(v.item() == 0 for v in stats.values())
    loss.backward()  # still connected to the scores (the all_gather backward must run on every rank)
    assert torch.equal(scores.grad, torch.zeros(3, 4))
    loss, count, _ = supcon_sum(torch.zeros(0, 0), none[:0, :0], none[:0, :0], 0.5)
    assert loss.item() == 0.0 and int(count) == 0


def test_supcon_sum_bf16_upcast():
    scores, positive, valid, _ = random_problem(1, [2, 3])
    loss, _, _ = supcon_sum(scores.bfloat16(), positive, valid, 0.2)
    ref, _, _ = ref_supcon(scores.bfloat16().double(), positive, valid, 0.2)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref, rel=1e-5)


def test_supcon_sum_gradcheck():
    scores, positive, valid, _ = random_problem(2, [2, 3, 1])
    scores.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: supcon_sum(s, positive, valid, 0.3)[0], (scores,))


def test_hardest_negatives_keeps_the_n_best_scored_negatives_and_every_positive():
    scores = torch.tensor([[0.0, -3.0, -1.0, -0.5, -2.0, 5.0], [1.0, 2.0, -1.0, 3.0, 0.5, 0.0]])
    positive = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    valid = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 1]], dtype=torch.bool)  # 5.0 and 0.5: masked
    kept = hardest_negatives(scores, positive, valid, 2)
    # row 0: the negatives -0.5 and -1.0 (not the first two, not the masked 5.0); row 1: 3.0 and 0.0
    assert kept.tolist() == [[1, 0, 1, 1, 0, 0], [1, 1, 0, 1, 0, 1]]
    assert torch.equal(hardest_negatives(scores, positive, valid, 0), valid)
    assert torch.equal(hardest_negatives(scores, positive, valid, 9), valid)
    few = hardest_negatives(
        scores, positive, torch.tensor([[1, 0, 0, 1, 0, 0], [1, 1, 0, 0, 0, 0]]).bool(), 2
    )
    assert few.tolist() == [[1, 0, 0, 1, 0, 0], [1, 1, 0, 0, 0, 0]]  # fewer than n: all of them, no more
    loss_all, _, _ = supcon_sum(scores, positive, valid, 1.0)
    loss_mined, _, _ = supcon_sum(scores, positive, kept, 1.0)
    assert loss_mined < loss_all  # easy negatives left the denominator


def test_false_negative_mask_hand_built():
    group = torch.tensor([0, 0, 1, 2, 3])
    keys = torch.tensor([7, 7, 7, -1, -1])  # contexts 0 and 1 state the same answer; 2, 3 unknown
    m = false_negative_mask(group, keys, group, keys)
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[0, 2] = expected[1, 2] = expected[2, 0] = expected[2, 1] = True  # same key, other context
    assert torch.equal(m, expected)  # same group never masked, -1 == -1 never masked
    # asymmetric shapes: anchors of one rank against a gathered batch
    m2 = false_negative_mask(group[:2], keys[:2], torch.tensor([5, 0, 6]), torch.tensor([7, 7, 8]))
    assert torch.equal(m2, torch.tensor([[True, False, False], [True, False, False]]))


def test_false_negative_leaves_denominator():
    feats = F.normalize(
        torch.randn(5, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64), dim=-1
    )
    group = torch.tensor([0, 0, 1, 1, 2])
    keys = torch.tensor([4, 4, 4, 4, -1])
    scores, positive, valid = embedding_scores(feats, group, keys)
    _, _, valid_plain = embedding_scores(feats, group)
    assert torch.allclose(scores, feats @ feats.T)
    assert torch.equal(positive, (group[:, None] == group[None, :]) & ~torch.eye(5, dtype=torch.bool))
    assert torch.equal(valid_plain, ~torch.eye(5, dtype=torch.bool))
    assert torch.equal(valid, valid_plain & ~false_negative_mask(group, keys, group, keys))
    masked, _, _ = supcon_sum(scores, positive, valid, 0.5)
    plain, _, _ = supcon_sum(scores, positive, valid_plain, 0.5)
    ref_masked, _, _ = ref_supcon(scores, positive, valid, 0.5)
    ref_plain, _, _ = ref_supcon(scores, positive, valid_plain, 0.5)
    assert masked.item() == pytest.approx(ref_masked, rel=1e-12)
    assert plain.item() == pytest.approx(ref_plain, rel=1e-12)
    assert masked.item() < plain.item() - 1e-3  # fewer denominator terms -> strictly lower loss


# --------------------------------------------------------------------------------------------------
# Real 2-rank run (gloo)
# --------------------------------------------------------------------------------------------------

SPLITS = ((3, 5), (8, 0))  # uneven rows per rank; a rank with no rows must still join the backward
GROUPS = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3])  # group 1 spans both ranks; group 3 has no positive
KEYS = torch.tensor([-1, -1, 9, 9, 9, 9, 9, -1])  # contexts 1 and 2 state the same answer
TAU = 0.5


def batch_and_model():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(GROUPS), 6, generator=g, dtype=torch.float64)
    torch.manual_seed(0)  # same Linear init on every rank
    lin = torch.nn.Linear(6, 4).double()
    return x, lin


def _rank_main(rank: int, port: int, out: Path) -> None:
    try:
        torch.distributed.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=2,
            timeout=timedelta(seconds=60),
        )
        results = []
        for split in SPLITS:
            x, lin = batch_and_model()
            lo, hi = sum(split[:rank]), sum(split[: rank + 1])
            feats = F.normalize(lin(x[lo:hi]), dim=-1)  # (n_r, 4)
            _, offset = gather_with_grad(feats.detach())
            scores, positive, valid = embedding_scores(feats, GROUPS[lo:hi], KEYS[lo:hi])
            loss, count, _ = supcon_sum(scores, positive, valid, TAU)
            loss.backward()
            totals = torch.stack([loss.detach(), count.double()])
            for t in (totals, lin.weight.grad, lin.bias.grad):
                torch.distributed.all_reduce(t)  # SUM, as the engine's gradient all-reduce
            results.append(
                dict(
                    totals=totals,
                    w=lin.weight.grad,
                    b=lin.bias.grad,
                    shape=tuple(scores.shape),
                    offset=offset,
                )
            )
        # Candidate rows re-tokenised for another tokenizer are as wide as each rank's longest: padded to
        # the widest rank's with zeros before they are gathered.
        results.append(dict(widened=global_width(torch.ones(2, 3 + 2 * rank, dtype=torch.long))))
        torch.save(results, out / f"rank{rank}.pt")
        torch.distributed.destroy_process_group()
    except BaseException:
        (out / f"error{rank}.txt").write_text(traceback.format_exc())
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_rank_gather_matches_single_process(tmp_path):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, tmp_path)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for r, p in enumerate(procs):
        if p.is_alive():
            p.kill()
        err = tmp_path / f"error{r}.txt"
        assert p.exitcode == 0, err.read_text() if err.exists() else f"rank {r} exit code {p.exitcode}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # One process, the whole batch, masks built by hand (not through embedding_scores).
    x, lin = batch_and_model()
    feats = F.normalize(lin(x), dim=-1)
    eye = torch.eye(8, dtype=torch.bool)
    positive = (GROUPS[:, None] == GROUPS[None, :]) & ~eye
    fn = (KEYS[:, None] == KEYS[None, :]) & (KEYS[:, None] >= 0) & (GROUPS[:, None] != GROUPS[None, :])
    loss, count, _ = supcon_sum(feats @ feats.T, positive, ~eye & ~fn, TAU)
    loss.backward()
    assert int(count) == 7

    for i, split in enumerate(SPLITS):
        r0, r1 = ranks[0][i], ranks[1][i]
        assert (r0["shape"], r0["offset"]) == ((split[0], 8), 0), split
        assert (r1["shape"], r1["offset"]) == ((split[1], 8), split[0]), split
        assert int(r0["totals"][1]) == 7, split
        assert r0["totals"][0].item() == pytest.approx(loss.item(), rel=1e-9), split
        torch.testing.assert_close(r0["w"], lin.weight.grad, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(r0["b"], lin.bias.grad, rtol=1e-7, atol=1e-9)
    assert ranks[0][-1]["widened"].tolist() == [[1, 1, 1, 0, 0]] * 2
    assert ranks[1][-1]["widened"].tolist() == [[1] * 5] * 2


# --------------------------------------------------------------------------------------------------
# Scorers and SimCTG
# --------------------------------------------------------------------------------------------------


def test_continuation_logprob_matches_loop():
    g = torch.Generator().manual_seed(4)
    N, W, V = 3, 6, 7
    logits = torch.randn(N, W, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (N, W), generator=g)
    cont = torch.zeros(N, W, dtype=torch.bool)
    cont[0, 3:5] = True
    cont[1, 2:6] = True
    cont[2, 0:2] = True  # position 0 has no predictor: only position 1 is scored
    out = continuation_logprob(logits, ids, cont)
    for n in range(N):
        terms = [torch.log_softmax(logits[n, t - 1], -1)[ids[n, t]].item() for t in range(1, W) if cont[n, t]]
        assert out[n].item() == pytest.approx(sum(terms) / len(terms), rel=1e-12)
    logits.requires_grad_(True)
    continuation_logprob(logits, ids, cont).sum().backward()
    assert logits.grad[0, 5].abs().sum() == 0 and logits.grad[0, 3].abs().sum() > 0  # only predicting rows


def test_simctg_sum_matches_loop():
    g = torch.Generator().manual_seed(5)
    N, W, H, rho = 3, 5, 4, 0.5
    hidden = torch.randn(N, W, H, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]], dtype=torch.bool)
    total, count = simctg_sum(hidden, mask, rho)
    ref, ref_count = 0.0, 0
    for n in range(N):
        toks = [hidden[n, t] for t in range(W) if mask[n, t]]
        k = len(toks)
        if k < 2:
            continue
        cos = lambda a, b: F.cosine_similarity(a, b, dim=0).item()  # noqa: E731
        s = sum(
            max(0.0, rho - cos(toks[i], toks[i]) + cos(toks[i], toks[j]))
            for i in range(k)
            for j in range(k)
            if i != j
        )
        ref += s / (k * (k - 1))
        ref_count += 1
    assert int(count) == ref_count == 2
    assert total.item() == pytest.approx(ref, rel=1e-10)


def test_pool_continuation_and_head():
    hidden = torch.randn(3, 4, 8, dtype=torch.bfloat16)
    cont = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    pooled = pool_continuation(hidden, cont)
    assert pooled.dtype == torch.float32 and torch.isfinite(pooled).all()
    torch.testing.assert_close(pooled[0], hidden[0, 1:3].float().mean(0))
    assert torch.equal(pooled[1], torch.zeros(8))
    head = ProjectionHead(8, 5)
    f = head(pooled)
    assert f.shape == (3, 5) and torch.isfinite(f).all()
    torch.testing.assert_close(f.norm(dim=-1), torch.ones(3))
