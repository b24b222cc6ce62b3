"""Stage `contrastive`: the distilled student fine-tuned on candidate groups (docs/architecture.md).

    stablekd stage contrastive configs/quickstart.yaml run.out_dir=runs/quickstart

Starts from student/hf (the distill stage's export; contrastive.init_from names another) and runs on ranks with its own DeepSpeed JSON
(`contrastive.ds_config`). A micro-batch is B candidate groups (soft_labels/candidates/: a context and its
G = M sampled + gold continuations, data_pipeline/candidates.py) plus B sequences of the soft-label stream
(or the plain training stream with contrastive.lm=ce). Loss terms, each the mean over its own global count:

    infonce  multi-positive InfoNCE (objectives/contrastive.py), over anchors with a positive:
             - scorer likelihood: anchor = a context; s(x, y) = mean log p(y | x) under the model for its own
               G continuations (positives) and `negatives` continuations of other contexts of the global
               batch (their ids are gathered; scores are computed here, so gradients stay local);
             - scorer embedding: anchor = a continuation; f = L2-normalised projection of the mean last
               hidden state over its tokens; positives the same context's other continuations, negatives
               every other continuation of the global batch (features gathered with gradients).
    lm       × contrastive.lam: KD from the soft labels (distill.kind, distill.temperature) or CE, per token.
    simctg   with contrastive.margin > 0: SimCTG's token-level term on the LM sequences.

Labels (contrastive.labels; data_pipeline/answers.py): which continuations of a context are its
positives and which its hard negatives. On the built-in bios corpus the ground truth judges them
(data_pipeline/contexts.py: a parsed answer contradicting the truth is a hard negative, only those
stating it are positives). Elsewhere a task prompt's reference response (the gold row) labels its group:
samples giving the reference's answer are positives, other answers hard negatives; a context without one
(a prose start) is labelled by the teacher's majority answer among its samples, and a tie or
all-different samples leave the group unlabelled (no anchor). A row that gives no answer is left out of
its own context's scores by the likelihood scorer (the embedding scorer makes it a negative of every
anchor), since rewarding it would train the model to answer nothing; another context's row giving the
anchor's answer is a false negative and leaves the denominator. With labels=none every continuation of
a context is its positive. How many groups each rule labelled goes into DONE.json (`labels`) and the
report. With contrastive.own_samples = n the model being trained samples n continuations of each context
of every micro-batch (`OwnSamples`, as the teacher sampled them), judged by the same rule without voting:
its own wrong answers become its hard negatives, on-policy (train/own_right: the share it gets right).
Bios contexts ask with bios.CONTEXT_TEMPLATES only; the report's probe asks with the others, and on a
user corpus it asks held-out records (no leakage).

A student with its own tokenizer (distill.cross_tokenizer, student/hf exported with it): each group is
labelled on the teacher's ids, then re-tokenised for the student by text (data_pipeline/candidate_realign.py);
the KD term reads the soft labels realigned as the distill stage reads them (distill_parts.student_batches)
through its cross-tokenizer loss (objectives/kd_losses.py `cross_head_loss`: distill.cross_tokenizer,
counted over the aligned positions), the CE term and the eval loss read the corpus in its tokens.

Leaves contrastive/ckpt, contrastive/hf and contrastive/DONE.json. TensorBoard tb/contrastive: train/infonce,
train/lm, train/pos_sim, train/neg_sim, train/acc1 (a positive scores highest), train/own_right, perf/*.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from transformers.integrations import HfDeepSpeedConfig

from stablekd.data_pipeline import bios
from stablekd.data_pipeline.align import Aligner, TokenBytes
from stablekd.data_pipeline.answers import Judgement, continuation_texts, judge_answers
from stablekd.data_pipeline.candidate_realign import realign_groups
from stablekd.data_pipeline.candidates import (
    candidate_batch,
    candidate_reader,
    flat_candidates,
    training_groups,
    trim_generated,
)
from stablekd.data_pipeline.contexts import bios_truth, judge_continuations
from stablekd.data_pipeline.on_policy import sample_seed
from stablekd.data_pipeline.shards.format import CANDIDATES
from stablekd.data_pipeline.shards.loader import ShardLoader
from stablekd.data_pipeline.shards.manifest import read_manifest
from stablekd.data_pipeline.stream import PackedStream, StreamLoader, eval_batches
from stablekd.data_pipeline.tokenizer import load_tokenizer, tokenizer_hash
from stablekd.ds_configs.resolve import zero_stage
from stablekd.launcher import done, models, rundir
from stablekd.launcher.config import ContrastiveConfig, ExperimentConfig
from stablekd.launcher.rank import artifacts, distill_parts, engine
from stablekd.model.build import build_model, flops_per_token
from stablekd.objectives.contrastive import (
    ProjectionHead,
    continuation_rows,
    embedding_scores,
    gather_no_grad,
    global_width,
    hardest_negatives,
    pool_continuation,
    simctg_sum,
    supcon_sum,
)
from stablekd.objectives.kd import (
    kd_rows,
    slice_teacher,
    soft_label_targets,
    soft_label_teacher,
    teacher_rows,
)
from stablekd.objectives.kd_losses import cross_head_loss
from stablekd.objectives.lm import IGNORE_INDEX, HeadLoss, Loss, ce_fn, lm_loss, shifted_labels


class LMWithHead(torch.nn.Module):
    """The causal LM and the embedding scorer's projection head, one module for one DeepSpeed engine."""

    def __init__(self, lm: torch.nn.Module, head_dim: int) -> None:
        super().__init__()
        self.lm, self.head = lm, ProjectionHead(lm.config.get_text_config().hidden_size, head_dim)

    def forward(self, **kwargs):
        return self.lm(**kwargs)


Labeller = Callable[[list[int], list[list[int]], bool], Judgement]


def labeller(cfg: ExperimentConfig, tokenizer, voters: int, gold: bool) -> Labeller:
    """(context ids, row ids, the last row is a reference) -> the group's Judgement under
    contrastive.labels; `voters` = the teacher's samples per group (the first rows), `gold`: the last row
    is the gold one (rows between are the student's own samples)."""
    rule = cfg.contrastive.labels
    if rule == "none":
        return lambda ctx, rows, ref: Judgement([0] * len(rows), [-1] * len(rows), -1, False, -1, "none")
    if rule == "truth" or (rule == "auto" and not cfg.data.paths):
        truth = bios_truth(bios.load_truth(cfg.run_dir / "data" / "truth.json")[0])
        return lambda ctx, rows, ref: judge_continuations(tokenizer, ctx, rows, truth)
    stop = cfg.data.answer_stop
    return lambda ctx, rows, ref: judge_answers(
        continuation_texts(tokenizer, ctx, rows), voters, gold, ref, rule, stop
    )


def group_rows(g: dict, b: int) -> tuple[list[int], list[list[int]], bool]:
    """Group b of a batch of candidate groups as (context ids, row ids, the last row is a reference)."""
    ctx = g["context_ids"][b, -int(g["context_len"][b]) :].tolist()
    rows = [g["cand_ids"][b, j, : int(g["cand_len"][b, j])].tolist() for j in range(g["cand_ids"].shape[1])]
    return ctx, rows, bool(g["reference"][b])


def label_summary(groups, label: Labeller) -> dict:
    """How the candidate set's groups were labelled: groups per rule, rows per verdict (DONE.json, report)."""
    rules: Counter = Counter()
    rows: Counter = Counter()
    for g in groups:
        for b in range(g["cand_ids"].shape[0]):
            judged = label(*group_rows(g, b))
            rules[judged.rule] += 1
            if judged.known:
                rows.update({1: "positive", -1: "hard_negative", 0: "left_out"}[v] for v in judged.verdicts)
    return {"groups": dict(rules), "rows": dict(rows)}


class OwnSamples:
    """contrastive.own_samples: N continuations of each context of a batch of groups, sampled by the model
    being trained, as rows of the groups (before the gold row), so the labeller judges them like the
    teacher's: what the student itself answers wrong becomes a hard negative, on-policy.

    Drawn as the candidates were (their meta's temperature, top_p and max_new_tokens) with a generator of
    their own seeded by (seed, the micro-batch's number, rank): a resumed run, whose weights and position
    are the uninterrupted run's, draws the same rows, and the training RNG is not touched. `sample` is
    distill_parts.sampler's (ZeRO-3 on several ranks: every rank samples once per micro-batch, in lockstep).
    """

    def __init__(self, sample: Callable, n: int, seed: int, rank: int, eos_id: int, gold: bool) -> None:
        self.sample, self.n, self.seed, self.rank = sample, n, seed, rank
        self.eos_id, self.gold = eos_id, gold

    def __call__(self, g: dict, index: int) -> dict:
        B, G, T = g["cand_ids"].shape
        C = g["context_ids"].shape[1]
        # The stored contexts are left-padded (data_pipeline/candidates.py): generate needs their mask.
        mask = (torch.arange(C)[None, :] >= C - g["context_len"].long()[:, None]).long()  # [B, C]
        ids, mask = g["context_ids"].long().repeat_interleave(self.n, 0), mask.repeat_interleave(self.n, 0)
        with torch.no_grad():  # [B·n, C + ≤T]: context b's rows are b·n .. b·n + n − 1
            seqs = self.sample(ids, sample_seed(self.seed, index, self.rank), mask)
        cand, lens = trim_generated(seqs[:, C:].cpu(), self.eos_id, T)
        at = G - int(self.gold)  # the teacher's rows, the student's, then the gold row
        own = torch.zeros(B, G + self.n, dtype=torch.bool)
        own[:, at : at + self.n] = True
        return {
            **g,
            "cand_ids": torch.cat([g["cand_ids"][:, :at], cand.view(B, self.n, T), g["cand_ids"][:, at:]], 1),
            "cand_len": torch.cat([g["cand_len"][:, :at], lens.view(B, self.n), g["cand_len"][:, at:]], 1),
            "own": own,  # [B, G + n] the student's rows
        }


class GroupsWithLM:
    """Candidate groups (each labelled) zipped with LM batches; one resumable position. With `own` the
    model's own samples join each group first (`OwnSamples`). With `retokenize` (a student with its own
    tokenizer: data_pipeline/candidate_realign.py) the groups are labelled on the teacher's ids, which the
    labeller's tokenizer reads, then re-tokenised row for row."""

    def __init__(
        self,
        groups,
        lm,
        label: Labeller,
        retokenize: Callable[[dict], dict] | None = None,
        own: OwnSamples | None = None,
    ) -> None:
        self.groups, self.lm, self.label, self.retokenize, self.own = groups, lm, label, retokenize, own
        self.index = 0  # micro-batches drawn so far: the next one's number (seeds the own samples)

    def __iter__(self) -> Iterator[dict]:
        for g, lm in zip(self.groups, self.lm, strict=True):
            index = self.index
            self.index += 1
            if self.own is not None:
                g = self.own(g, index)
            B, G, _ = g["cand_ids"].shape
            verdicts, keys = torch.zeros(B, G, dtype=torch.long), torch.full((B, G), -1)
            truth_keys, asked = torch.full((B,), -1), torch.full((B,), -1)
            known = torch.zeros(B, dtype=torch.bool)
            for b in range(B):
                judged = self.label(*group_rows(g, b))
                verdicts[b], keys[b] = torch.tensor(judged.verdicts), torch.tensor(judged.keys)
                truth_keys[b], known[b], asked[b] = judged.truth_key, judged.known, judged.attribute
            if self.retokenize is not None:
                g = self.retokenize(g)
            yield {
                **g,
                "verdict": verdicts,  # [B, G] +1 positive, -1 hard negative, 0 left out (or no label)
                "known": known,  # [B] the group is labelled: verdict 0 = left out
                "answer_key": keys,  # [B, G]
                "truth_key": truth_keys,  # [B]
                "attribute": asked,  # [B] what a question context asks (bios.ATTRIBUTES index), -1 otherwise
                **{f"lm_{k}": v for k, v in lm.items()},
            }

    def state_dict(self) -> dict:
        return {"groups": self.groups.state_dict(), "lm": self.lm.state_dict(), "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.groups.load_state_dict(state["groups"])
        self.lm.load_state_dict(state["lm"])
        self.index = int(state.get("index", 0))  # a checkpoint of an earlier version drew no own samples


def _positive(batch: dict) -> torch.Tensor:
    """[B, G]: positive rows of labelled groups; any row of an unlabelled one (labels=none)."""
    v = batch["verdict"]
    return torch.where(batch["known"][:, None], v > 0, v >= 0)


def _unverifiable(batch: dict) -> torch.Tensor:
    """[B, G]: rows of a labelled group that are left out (no answer, the gold row under majority, or the
    whole group when no rule could label it)."""
    return batch["known"][:, None] & (batch["verdict"] == 0)


def _lm_batch(batch: dict) -> dict:
    """The LM term's own batch (its keys without the "lm_" prefix): a packed-stream batch (CE) or a
    decoded soft-label batch (KD)."""
    return {k[3:]: v for k, v in batch.items() if k.startswith("lm_")}


def _lm_labels(lm: dict) -> torch.Tensor:
    """[B, L] labels of the LM term: the packed stream's (CE), or the soft labels' ids and loss mask (KD)."""
    return lm["labels"].long() if "labels" in lm else soft_label_targets(lm)


def counts(c: ContrastiveConfig) -> Callable[[dict], dict[str, int]]:
    def count(batch: dict) -> dict[str, int]:
        pos = _positive(batch)
        if c.scorer == "likelihood":  # an anchor per context with a positive
            anchors = int(pos.any(-1).sum())
        else:  # an anchor per continuation with another positive in its group
            anchors = int((pos & (pos.sum(-1, keepdim=True) >= 2)).sum())
        lm_batch = _lm_batch(batch)
        if "aligned" in lm_batch:  # KD across tokenizers: the aligned positions (objectives/kd_losses.py)
            lm = int(lm_batch["aligned"].sum())
        else:
            lm = int((shifted_labels(_lm_labels(lm_batch)) != IGNORE_INDEX).sum())
        out = {"infonce": anchors, "lm": lm}
        if c.margin > 0:
            out["simctg"] = batch["lm_input_ids"].shape[0]
        return out

    return count


def pick_negatives(
    pool_group: torch.Tensor,
    pool_attr: torch.Tensor,
    group: torch.Tensor,
    attribute: torch.Tensor,
    k: int,
    similar: bool,
) -> torch.Tensor:
    """[B, K] rows of the pool (group ids, attributes: [N]) as negatives of each anchor (group, attribute:
    [B]): K = min(k, fewest other-context rows of any anchor), drawn in random order (the torch RNG, which
    a resume restores); with `similar`, rows asking about the anchor's attribute (>= 0) come first."""
    picks = []
    for g, a in zip(group.tolist(), attribute.tolist(), strict=True):
        others = (pool_group != g).nonzero().squeeze(-1)
        others = others[torch.randperm(len(others))]
        if similar and a >= 0:
            # Another person's answer to the same question is what a model confuses with the truth.
            same = pool_attr[others] == a
            others = torch.cat([others[same], others[~same]])
        picks.append(others[:k])
    K = min(len(p) for p in picks)
    return torch.stack([p[:K] for p in picks])


def _likelihood_scores(
    model, batch: dict, c: ContrastiveConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scores [B, G + K] = mean log p(y | x_b) over the first `c.score_tokens` tokens of context b's own G
    continuations, then of K = `c.negatives` continuations of other contexts drawn from the global batch
    (with `c.similar_negatives`, those asking about the same attribute first); positive / valid masks of
    the same shape."""
    # [B, G, T], T <= the stored width; as wide as on every rank (re-tokenised groups vary) to be gathered
    cand = global_width(batch["cand_ids"][..., : c.score_tokens or None])
    T = cand.shape[-1]
    cand_len = batch["cand_len"].clamp(max=T)
    keys = batch["answer_key"]
    B, G = cand.shape[:2]
    rank = dist.get_rank() if dist.is_initialized() else 0
    group = (
        torch.arange(B, device=cand.device) + rank * B
    )  # unique in the global batch (same B on every rank)
    pool, _ = gather_no_grad(cand.reshape(B * G, T))  # [N, T]: every continuation of the global batch
    pool_len, _ = gather_no_grad(cand_len.reshape(B * G))
    pool_key, _ = gather_no_grad(keys.reshape(B * G))
    pool_group, _ = gather_no_grad(group.repeat_interleave(G))
    pool_attr, _ = gather_no_grad(batch["attribute"].repeat_interleave(G))
    neg = pick_negatives(pool_group, pool_attr, group, batch["attribute"], c.negatives, c.similar_negatives)
    K = neg.shape[1]
    rows = {
        "context_ids": batch["context_ids"],
        "context_len": batch["context_len"],
        "cand_ids": torch.cat([cand, pool[neg]], 1),  # [B, G + K, T]
        "cand_len": torch.cat([cand_len, pool_len[neg]], 1),
    }
    laid = candidate_batch(rows)  # [B, G + K, W] each
    flat = {k: laid[k].flatten(0, 1) for k in ("input_ids", "attention_mask", "position_ids", "cont_mask")}
    fn, scored, n = continuation_rows(flat["input_ids"], flat["cont_mask"])
    logprob, _ = model(
        input_ids=flat["input_ids"], attention_mask=flat["attention_mask"], position_ids=flat["position_ids"],
        head_loss=HeadLoss(fn, scored),
    )  # fmt: skip  # the head's chunks of [B·(G + K)·W, V] logits, never all of them
    scores = (logprob / n).view(B, G + K)
    positive = torch.cat([_positive(batch), torch.zeros(B, K, dtype=torch.bool, device=cand.device)], 1)
    # Another context's continuation stating this context's true answer is not a negative.
    false_neg = (pool_key[neg] == batch["truth_key"][:, None]) & (batch["truth_key"][:, None] >= 0)
    valid = torch.cat([~_unverifiable(batch), ~false_neg], 1)
    return scores, positive, valid


def _embedding_scores(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, G, _ = batch["cand_ids"].shape
    rank = dist.get_rank() if dist.is_initialized() else 0
    flat = flat_candidates(batch, first_group=rank * B)  # [B·G, W], group ids unique in the global batch
    out = model(
        input_ids=flat["input_ids"], attention_mask=flat["attention_mask"], position_ids=flat["position_ids"],
        output_hidden_states=True,
    )  # fmt: skip
    head = model.module.head if hasattr(model, "module") else model.head
    features = head(pool_continuation(out.hidden_states[-1], flat["cont_mask"]))  # [B·G, D]
    groups = flat["group_ids"].to(features.device)
    # A contradiction (or an unverifiable row) gets a group of its own: nobody's positive, everybody's negative.
    contra = ~_positive(batch).flatten()
    own = -1 - (rank * B * G + torch.arange(B * G, device=groups.device))  # negative: never a context's id
    groups = torch.where(contra, own, groups)
    return embedding_scores(features, groups, batch["answer_key"].flatten())


def make_loss(cfg: ExperimentConfig, vmap: torch.Tensor | None = None):
    """InfoNCE (the configured scorer) + lam · (KD or CE), from the last hidden state chunk by chunk (the
    head cuts padded embedding rows: model/head.py). KD on realigned soft labels (a student with its own
    tokenizer) is the distill stage's cross-tokenizer KD (`cross_head_loss`; `vmap` for hybrid)."""
    c, d = cfg.contrastive, cfg.distill

    def loss(model, batch: dict) -> Loss:
        if c.scorer == "likelihood":
            scores, positive, valid = _likelihood_scores(model, batch, c)
            valid = hardest_negatives(scores, positive, valid, c.hard_negatives)
        else:
            scores, positive, valid = _embedding_scores(model, batch)
        nce, _, stats = supcon_sum(scores, positive, valid, c.tau)
        lm_batch = _lm_batch(batch)
        ids, labels = lm_batch["input_ids"].long(), _lm_labels(lm_batch)  # [B, L] each
        fn, live = ce_fn(labels)
        head = HeadLoss(fn, live)
        if c.lm == "kd" and "aligned" in lm_batch:
            head = cross_head_loss(lm_batch, d.cross_tokenizer, d.kind, d.temperature, d.beta, d.skew, vmap)
        elif c.lm == "kd":
            teacher = teacher_rows(soft_label_teacher(lm_batch))

            def kd(z: torch.Tensor, s: slice) -> torch.Tensor:
                return kd_rows(z, slice_teacher(teacher, s), live[s], d.kind, d.temperature, d.beta, d.skew)

            head = HeadLoss(kd, live)
        lm, hidden = model(input_ids=ids, head_loss=head)
        sums = {"infonce": nce, "lm": lm}
        if c.margin > 0:
            sums["simctg"] = simctg_sum(hidden, torch.ones_like(ids, dtype=torch.bool), c.margin)[0]
        anchors = float(stats["anchors"])
        metrics = {
            "pos_sim": (float(stats["pos_sim"]), anchors),
            "neg_sim": (float(stats["neg_sim"]), float(stats["neg_anchors"])),
            "acc1": (float(stats["acc1"]), anchors),
        }
        if (
            "own" in batch
        ):  # the share of the model's own samples in labelled groups giving the group's answer
            own = batch["own"] & batch["known"][:, None]
            metrics["own_right"] = (float((own & (batch["verdict"] > 0)).sum()), float(own.sum()))
        return Loss(sums, metrics)

    return loss


def _lm_batches(cfg: ExperimentConfig, rank: int, world: int, micro: int, tokenizer) -> tuple:
    """The LM term's batches in the student's tokens and, for KD across tokenizers, the Aligner that
    realigned the soft labels (the distill stage's: distill_parts.student_batches), else None."""
    if cfg.contrastive.lm == "kd" and models.cross_tokenizer(cfg):
        return distill_parts.student_batches(cfg, rank, world, micro, tokenizer)
    if cfg.contrastive.lm == "kd":
        return artifacts.open_soft_labels(cfg, rank, world, micro), None
    stream = PackedStream(
        rundir.train_files(cfg), models.student_tokenizer_dir(cfg), cfg.data.seq_len, micro, rank, world,
        cfg.data.num_workers,
    )  # fmt: skip
    return StreamLoader(stream), None


def run(cfg: ExperimentConfig) -> None:
    rank, world = engine.setup_distributed(cfg.launch.threads_per_rank, cfg.launch.timeout_s)
    engine.seed_rng(cfg.run.seed)  # the negatives' draws (and the embedding head's init) repeat run to run
    c, run_dir, seq_len = cfg.contrastive, cfg.run_dir, cfg.data.seq_len
    ds = json.loads(rundir.ds_path(cfg, "contrastive").read_text())
    zero3 = zero_stage(ds) == 3
    hf_ds = HfDeepSpeedConfig(ds) if zero3 else None  # noqa: F841  (built inside zero.Init)
    # Candidates are in the run's (teacher's) ids; the student may have its own (distill.cross_tokenizer).
    run_tok, tok_dir = models.tokenizer_dir(cfg), models.student_tokenizer_dir(cfg)
    teacher_tokenizer, tokenizer = load_tokenizer(run_tok), load_tokenizer(tok_dir)
    start = rundir.contrastive_start(cfg)
    lm = build_model(str(start), tokenizer, seq_len, cfg.run.seed)
    with torch.random.fork_rng():  # one head on every rank: seed_rng gave each rank its own stream
        torch.manual_seed(cfg.run.seed)
        model = LMWithHead(lm, c.head_dim) if c.scorer == "embedding" else lm
    micro = ds["train_micro_batch_size_per_gpu"]
    cand_dir = rundir.stage_dir(cfg, "soft_labels") / "candidates"
    groups = training_groups(
        cand_dir, {"tokenizer_hash": tokenizer_hash(run_tok)}, micro, rank, world, cfg.data.num_workers
    )
    meta = read_manifest(cand_dir, CANDIDATES)["meta"]
    label = labeller(cfg, teacher_tokenizer, meta["m"], meta["gold"])
    labels = {"rule": c.labels}
    if rank == 0:  # the whole candidate set, once: what DONE.json and the report say of the labels
        labels.update(label_summary(ShardLoader(candidate_reader(cand_dir), 64), label))
        rundir.say(f"[contrastive] labels ({c.labels}): {labels['groups']} groups, rows {labels['rows']}")
    lm_batches, kd_aligner = _lm_batches(cfg, rank, world, micro, tokenizer)
    vmap = distill_parts.cross_vmap(cfg, kd_aligner) if kd_aligner is not None else None
    retokenize = None
    if tokenizer_hash(tok_dir) != tokenizer_hash(run_tok):
        aligner = kd_aligner or Aligner(TokenBytes.from_tokenizer(teacher_tokenizer), tokenizer, seq_len)
        retokenize = functools.partial(
            realign_groups, aligner=aligner, ctx_len=meta["ctx_len"], cont_len=seq_len - meta["ctx_len"]
        )
    own = None
    if c.own_samples:  # the student samples as the teacher did (config refuses it across tokenizers)
        sample = distill_parts.sampler(
            lm, tokenizer, meta["max_new_tokens"], meta["temperature"], zero3 and world > 1, meta["top_p"]
        )
        own = OwnSamples(sample, c.own_samples, cfg.run.seed, rank, tokenizer.eos_token_id, meta["gold"])
    batches = GroupsWithLM(groups, lm_batches, label, retokenize, own)
    evals = eval_batches(rundir.eval_files(cfg), tok_dir, seq_len, micro, c.eval_batches, rank, world)
    weights = {"infonce": 1.0, "lm": c.lam, **({"simctg": 1.0} if c.margin > 0 else {})}
    stage = engine.Stage(
        "contrastive", model, batches, make_loss(cfg, vmap), evals, flops_per_token(lm, seq_len),
        weights=weights, count=counts(c), tokens=lambda b: b["lm_input_ids"].numel() + b["cand_ids"].numel(),
        eval_loss=lm_loss,
    )  # fmt: skip
    result = engine.train(stage, c, ds, run_dir, done.stage_hash(cfg, "contrastive"), cfg.run.trace_samples)

    module = result.engine.module
    produced = {"scorer": c.scorer, "labels": labels}
    if models.cross_tokenizer(cfg):
        produced["cross_tokenizer"] = cfg.distill.cross_tokenizer
    inputs = {"start": str(start), "tokenizer_hash": tokenizer_hash(run_tok)}
    inputs["student_tokenizer_hash"] = tokenizer_hash(tok_dir)
    artifacts.finish_training(
        cfg, "contrastive", result, module.lm if isinstance(module, LMWithHead) else module, tokenizer, ds,
        produced, inputs,
    )  # fmt: skip
