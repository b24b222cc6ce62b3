"""On-policy batches: a share of the student's micro-batches are its own samples, scored by the teacher.

Offline soft labels teach the student on the teacher's text; at generation time it conditions on its own,
and its errors compound (exposure bias). On-policy distillation (GKD, Agarwal et al. ICLR 2024; MiniLLM)
lets the student sample continuations and learn the teacher's distribution at every token of them.

`OnPolicy` wraps a soft-label batch source (offline shards or the online teacher, any encoding). Micro-batch
i (counted from the start of the run) is on-policy when ⌊(i + 1)·λ⌋ > ⌊i·λ⌋, so λ = 0.5 takes every
second one and every rank decides alike; with a ramp λ rises linearly from 0 over its first micro-batches
(`is_on_policy`). An on-policy micro-batch still draws the source's batch (the
source advances as it would offline) and uses the first `prompt_tokens` tokens of each of its records as
prompts, or as many task prompts (`TaskPrompts`): the student continues each by sampling (`sample`, under a seed of (seed, i, rank), so a resumed
run samples what the uninterrupted one would; drawn from a generator of its own, so the training RNG,
CPU and CUDA, is left untouched), the teacher runs its trunk on the
whole sequence once (its last hidden state (B, T, H) is the batch's `teacher_hidden`, its head the batch's
`teacher_head`, a model/head.py `HeadRows`), and the loss counts the generated tokens only: the prompt and
what follows a generated EOS are masked. The teacher's logits are made only inside the student's chunk
loop, one chunk of rows beside the student's (objectives/kd_losses.py `with_on_policy`): neither model's
(B·T, V) logits ever exist.

Lockstep: `sample` (a ZeRO-3 student generates with synced_gpus), the teacher's forward and, in the loss,
the teacher's head (gathered once per on-policy micro-batch) gather parameters collectively; every rank
draws the same micro-batches and computes their losses in the same order, so every rank makes the same calls.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from stablekd.data_pipeline.online import Teacher
from stablekd.objectives.lm import IGNORE_INDEX


def is_on_policy(index: int, share: float, ramp: int = 0) -> bool:
    """Whether micro-batch `index` of the run is on-policy at share λ = `share` (same on every rank).

    `ramp`: λ rises linearly from 0 to `share` over the first `ramp` micro-batches (a student trained from
    scratch samples noise at first: its samples are worth scoring once it writes something). Micro-batch
    i is on-policy when the running total of λ, S(x), passes an integer between x = i and i + 1; with no
    ramp S(x) = λ·x, so λ = 0.5 takes every second micro-batch."""

    def total(x: float) -> float:
        return share * x * x / (2 * ramp) if x < ramp else share * (x - ramp / 2)

    return math.floor(total(index + 1)) > math.floor(total(index))


def generated_labels(ids: torch.Tensor, prompt_len: int, eos_id: int) -> torch.Tensor:
    """(B, T) labels of sampled sequences: the generated tokens up to and including the first EOS;
    IGNORE_INDEX for the prompt and everything after that EOS (generate's padding)."""
    labels = ids.clone()
    labels[:, :prompt_len] = IGNORE_INDEX
    gen = ids[:, prompt_len:]
    after = (gen == eos_id).long().cumsum(-1) - (gen == eos_id).long() > 0  # past the first EOS
    labels[:, prompt_len:] = gen.masked_fill(after, IGNORE_INDEX)
    return labels


def sample_seed(seed: int, index: int, rank: int) -> int:
    """The seed of the samples a rank draws for micro-batch `index` of a run seeded with `seed`: fixed by
    the run's position, so a resumed run draws what the uninterrupted one would (launcher/stages/
    contrastive.py's own samples draw theirs alike)."""
    return (seed * 1_000_003 + index) * 1_009 + rank


class TaskPrompts:
    """Task prompts to draw on-policy micro-batches from (distill.on_policy_prompts=tasks): the question a
    task record asks, so the student learns from the teacher on its own answers, not only on its own prose.

    A micro-batch of B is B prompts of one length (prompts of several lengths would need padding, which
    neither the student's sampling nor the teacher's scoring of a record start has): one prompt drawn
    uniformly, its length's prompts drawn B − 1 times with replacement. Drawn with a generator of its own
    seeded like the samples, so a resumed run draws what the uninterrupted one would."""

    def __init__(self, prompts: Sequence[Sequence[int]]) -> None:
        if not prompts:
            raise ValueError("no task prompts")
        self.by_length: dict[int, list[list[int]]] = {}
        for ids in prompts:
            self.by_length.setdefault(len(ids), []).append(list(ids))
        self.count = len(prompts)

    def draw(self, batch: int, seed: int) -> torch.Tensor:
        """(batch, L) ids of `batch` prompts of one length L."""
        gen = torch.Generator().manual_seed(seed)
        first = int(torch.randint(self.count, (1,), generator=gen))
        for same in self.by_length.values():  # insertion order: fixed by the prompts' order
            if first < len(same):
                break
            first -= len(same)
        picks = [first, *torch.randint(len(same), (batch - 1,), generator=gen).tolist()]
        return torch.tensor([same[i] for i in picks], dtype=torch.long)


class OnPolicy:
    """A soft-label batch source whose micro-batches are, at share λ, the student's samples scored by the
    teacher (module docstring).

    Args:
        batches: decoded soft-label batches with state_dict/load_state_dict (artifacts.open_soft_labels).
        sample: (prompts (B, P), seed) -> sequences (B, P + N) sampled by the student (N new tokens; rows
            that end early are padded after their EOS) with a generator of its own seeded by `seed`: neither
            the global nor any CUDA generator is used or reseeded (launcher/rank/distill_parts.py `sampler`).
        teacher: `hidden(ids)` (B, T) -> (B, T, H) its last hidden state and `head_rows()` its head as a
            `HeadRows` over the run's ids (model.sharded_teacher.ShardedTeacher).
        share: λ in (0, 1]. prompt_tokens: P. seed, rank: what the sampling seed is made of.
        eos_id: the tokenizer's EOS. ramp: micro-batches over which λ rises from 0 (`is_on_policy`).
        prompts: `TaskPrompts` to continue instead of the records' first `prompt_tokens` tokens.
    """

    def __init__(
        self,
        batches: Any,
        sample: Callable[[torch.Tensor, int], torch.Tensor],
        teacher: Teacher,
        share: float,
        prompt_tokens: int,
        seed: int,
        rank: int,
        eos_id: int,
        ramp: int = 0,
        prompts: TaskPrompts | None = None,
    ) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        self.batches, self.sample, self.teacher = batches, sample, teacher
        self.share, self.prompt_tokens, self.seed, self.rank, self.eos_id = (
            share,
            prompt_tokens,
            seed,
            rank,
            eos_id,
        )
        self.ramp, self.prompts = ramp, prompts
        self.index = 0  # micro-batches drawn so far: the next one's number

    def seed_of(self, index: int) -> int:
        return sample_seed(self.seed, index, self.rank)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.batches:
            index = self.index
            self.index += 1
            yield self.scored(batch, index) if is_on_policy(index, self.share, self.ramp) else batch

    def scored(self, batch: dict[str, Any], index: int) -> dict[str, Any]:
        """The on-policy micro-batch `index` made from the source's `batch` (its records' first tokens, or as
        many task prompts)."""
        if self.prompts is None:
            prompts = batch["input_ids"][:, : self.prompt_tokens].long()
        else:
            prompts = self.prompts.draw(len(batch["input_ids"]), self.seed_of(index))
        t0 = time.perf_counter()
        with torch.no_grad():  # `sample` draws from its own generator: the loop's RNG (dropout) is untouched
            ids = self.sample(prompts, self.seed_of(index)).cpu()
        t1 = time.perf_counter()
        with torch.no_grad():
            hidden = self.teacher.hidden(ids)
        labels = generated_labels(ids, prompts.shape[1], self.eos_id)
        return {
            "input_ids": ids,
            "labels": labels,
            "teacher_hidden": hidden,
            "teacher_head": self.teacher.head_rows(),  # not a tensor: moved, digested as nothing
            "generate_s": t1 - t0,  # floats, not tensors: a trace's batch digest stays the samples'
            "teacher_s": time.perf_counter() - t1,  # the trunk; the head's matmuls are in the loss's time
        }

    def state_dict(self) -> dict:
        return {"on_policy_index": self.index, "source": self.batches.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "on_policy_index" not in state:
            raise ValueError(
                "this data state was saved without on-policy batches (distill.on_policy was 0); resume with "
                "the distill.on_policy the run started with"
            )
        self.index = int(state["on_policy_index"])
        self.batches.load_state_dict(state["source"])
