"""Candidate groups (data_pipeline/candidates.py) re-tokenised for a student with its own tokenizer.

A group's context and continuations are the teacher's ids of text. A student with another tokenizer
(distill.cross_tokenizer) reads the same text in its own ids: each sequence is spelled in bytes by the
teacher's `TokenBytes` and encoded by the student's tokenizer (`Aligner.tokens`, data_pipeline/align.py:
a special becomes the student's EOS, the encoding must give back the text byte for byte). Context and
continuations are encoded apart, so a continuation starts where the teacher's did (one encoding of the
whole text could merge a token across that boundary), and each row is the text the teacher sampled.

Widths: the context keeps its last `ctx_len` student tokens, a continuation its first `cont_len` (their
sum fits the student's positions); a batch is as wide as its longest context and continuation, padded in
the layout of candidates.py. The rows keep their order and the reference flags are carried over, so what
was judged of a row on the teacher's ids (contrastive labels: parsed from the text) holds for it.
A pure function of the batch: a resumed run re-tokenises the same groups the same way.
"""

from __future__ import annotations

import torch

from stablekd.data_pipeline.align import Aligner
from stablekd.data_pipeline.candidates import pack_groups


def realign_groups(
    batch: dict[str, torch.Tensor], aligner: Aligner, ctx_len: int, cont_len: int
) -> dict[str, torch.Tensor]:
    """A batch of candidate groups in teacher ids (context_ids [B, C], context_len [B], cand_ids [B, G, T],
    cand_len [B, G], reference [B]) -> the same groups in the student's ids, [B, C'] and [B, G, T'] with
    C' <= ctx_len and T' <= cont_len; other keys unchanged."""
    B, G, _ = batch["cand_ids"].shape
    contexts = [
        batch["context_ids"][b, batch["context_ids"].shape[1] - int(batch["context_len"][b]) :]
        for b in range(B)
    ]
    rows = [batch["cand_ids"][b, g, : int(batch["cand_len"][b, g])] for b in range(B) for g in range(G)]
    spelled = aligner.tokens([t.numpy() for t in contexts + rows])
    # Text that is only a cut UTF-8 character spells nothing; an empty row has no mean log-likelihood, so
    # it becomes the student's EOS (an ending), as a sampled EOS-only continuation is.
    spelled = [ids or [aligner.eos] for ids in spelled]
    ctx, cont = spelled[:B], spelled[B:]
    groups = [cont[b * G : (b + 1) * G] for b in range(B)]
    width_c = min(ctx_len, max(map(len, ctx)))
    width_t = min(cont_len, max(map(len, cont)))
    packed = pack_groups(ctx, groups, width_c, width_t, [bool(r) for r in batch["reference"].tolist()])
    return {**batch, **{k: torch.from_numpy(v) for k, v in packed.items()}}
