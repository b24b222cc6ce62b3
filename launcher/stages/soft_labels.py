"""Stage `soft_labels`: the sharded ZeRO-3 teacher labels the training stream and samples candidate groups.

    stablekd stage soft_labels configs/quickstart.yaml run.out_dir=runs/quickstart

Runs on the ranks of the teacher's partitioning (the deepspeed runner, like the teacher stage) with the
teacher's own DeepSpeed JSON `ds/teacher.json`: this section has no `ds_config` of its own, because the
teacher is loaded from its ZeRO-3 shards rank by rank and must be partitioned as it was trained
(model/sharded_teacher.py). On another number of ranks (distill.include with distill.follow leaves this
job part of the pool) the launching process first converts the checkpoint to a universal one.

Leaves (docs/architecture.md, File formats):
    soft_labels/           shard-r<rank>-<i>.safetensors + manifest.r<rank>.json while writing, manifest.json
                           when final: per token the token id, its loss mask and what
                           soft_labels.encoding keeps of softmax(logits / T) (the registry of
                           data_pipeline/encodings.py). meta: teacher checkpoint, tokenizer hash, vocab
                           size, T, seq_len, the encoding and its parameters, fidelity, and
                           `token_bytes`: the file beside the shards that gives each teacher id's bytes,
                           so a student with another tokenizer reads the records' text
                           (data_pipeline/align.py).
    soft_labels/candidates/  per context M sampled continuations (+ the gold one), same shard rules.
    soft_labels/DONE.json, tb/soft_labels/ (fidelity and throughput scalars; x-axis: labelled batches).

Per rank: the training stream as the teacher read it (PackedStream, rank-sharded, the teacher's seq_len
and tokenizer): one pass, or this rank's share of soft_labels.max_sequences (`rank_quota`) from the
looping stream. Later passes pack the same documents at other block offsets, so a student that trains
for many epochs sees more distinct sequences than one pass holds. Candidate contexts: rank r takes contexts r, r + world, ... of one list every rank builds
(`candidate_contexts`). A killed stage resumes: each rank skips the sequences (and contexts) its committed
shards already hold; a rank that had finished only joins the others' forwards.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from stablekd.data_pipeline import bios, encodings
from stablekd.data_pipeline.align import TokenBytes
from stablekd.data_pipeline.candidates import CandidateWriter, candidate_meta, pack_groups, trim_generated
from stablekd.data_pipeline.contexts import Context, bios_contexts, document_contexts, tokenize_contexts
from stablekd.data_pipeline.fidelity import PickedRows, fidelity, merge_fidelity
from stablekd.data_pipeline.files import atomic_write, read_marker
from stablekd.data_pipeline.online import lockstep
from stablekd.data_pipeline.shards.manifest import finalize
from stablekd.data_pipeline.soft_labels import (
    FIDELITY_RATE,
    SoftLabelWriter,
    config_meta,
    finalize_soft_labels,
)
from stablekd.data_pipeline.stream import PackedStream, StreamLoader
from stablekd.data_pipeline.tokenizer import tokenizer_hash
from stablekd.launcher import done, models, rundir
from stablekd.launcher.config import ConfigError, ExperimentConfig
from stablekd.launcher.rank import artifacts, engine
from stablekd.launcher.rank.monitor import Monitor
from stablekd.model.build import pad_id
from stablekd.model.sharded_teacher import ShardedTeacher
from stablekd.objectives.lm import IGNORE_INDEX


def rank_quota(max_sequences: int, rank: int, world: int) -> int | None:
    """This rank's share of max_sequences (the first max % world ranks take one more); None = no bound."""
    if max_sequences <= 0:
        return None
    return max_sequences // world + int(rank < max_sequences % world)


def _rows(
    batches: Iterable[dict], start: int, stop: int | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Rows [start, stop) of a stream of [B, L] batches as (input_ids, labels) slices ([b, L], b <= B)."""
    seen = 0
    for batch in batches:
        if stop is not None and seen >= stop:
            return
        ids = batch["input_ids"]
        lo, hi = max(start - seen, 0), ids.shape[0] if stop is None else min(stop - seen, ids.shape[0])
        if lo < hi:
            yield ids[lo:hi], batch["labels"][lo:hi]
        seen += ids.shape[0]


# A top-k/top-p set keeping less of the teacher's mass than this leaves the student a biased tail (docs/results.md,
# soft-label encodings: on KJV prose top-8 kept 0.56 and its student was 136 % worse than full logits).
LOW_MASS = 0.9


def low_mass_warning(encoding: str, kept_mass: float) -> str | None:
    """The line a run gets when its truncating labels (top-k, top-p: `truncates` in the encoding registry)
    keep too little of the teacher (None when they do not)."""
    if not encodings.get(encoding).truncates or kept_mass >= LOW_MASS:
        return None
    unbiased = " or ".join(
        f"soft_labels.encoding={n}" for n, e in encodings.REGISTRY.items() if not e.truncates
    )
    return (
        f"[soft_labels] warning: the stored {encoding} entries keep {kept_mass:.3f} of the teacher's mass on "
        f"average (< {LOW_MASS}): the student learns a biased tail; {unbiased} is unbiased (docs/results.md)"
    )


def _fidelity_path(out: Path, rank: int) -> Path:
    return out / f"fidelity.r{rank:03d}.json"


def label_stream(cfg: ExperimentConfig, teacher: ShardedTeacher) -> dict:
    """Write this rank's soft-label shards; rank 0 finalizes manifest.json. Returns a summary (same on all ranks).

    Fidelity: kept mass and KL(teacher ‖ what the encoding stores + uniform tail),
    data_pipeline.fidelity, on up to soft_labels.fidelity_positions positions per rank, one in FIDELITY_RATE of each batch, drawn
    at random, until the budget is spent.

    The teacher never makes a batch's whole [b, L, V] logits: its head makes them from the last hidden state
    one chunk of rows at a time (~64 MiB of float32), each encoded and dropped (`SoftLabelWriter.add_teacher`);
    the fidelity positions' rows ([take, V], at most one in FIDELITY_RATE of a batch) are copied to the host.
    """
    sl, rank, world = cfg.soft_labels, dist.get_rank(), dist.get_world_size()
    out, tok_dir, seq_len = (
        rundir.stage_dir(cfg, "soft_labels"),
        models.tokenizer_dir(cfg),
        cfg.data.seq_len,
    )
    meta = config_meta(sl, teacher.checkpoint_id, tokenizer_hash(tok_dir), teacher.vocab_size, seq_len)
    if rank == 0:  # before any shard: a student with another tokenizer reads the records' text through it
        out.mkdir(parents=True, exist_ok=True)
        TokenBytes.from_tokenizer(teacher.tokenizer).save(out / meta["token_bytes"])
    writer = SoftLabelWriter(out, rank, meta, sl.records_per_shard, world_size=world, seed=cfg.run.seed)
    quota = rank_quota(sl.max_sequences, rank, world)
    fid_path = _fidelity_path(out, rank)
    if writer.final:  # this rank finished before the stage was stopped: nothing to label
        rows: Iterator[tuple[torch.Tensor, torch.Tensor]] = iter(())
        fid = json.loads(fid_path.read_text()) if fid_path.exists() else merge_fidelity([])
    else:
        stream = PackedStream(
            rundir.train_files(cfg), tok_dir, seq_len, sl.micro_batch_size, rank, world,
            cfg.data.num_workers, loop=quota is not None,
        )  # fmt: skip
        # A resumed rank skips the sequences its committed shards hold (the stream is deterministic).
        rows = _rows(StreamLoader(stream), writer.records_written, quota)
        fid = merge_fidelity([])
    todo = None if quota is None else max(0, quota - writer.records_written)
    monitor = Monitor(
        rundir.tb_dir(cfg, "soft_labels"),
        None if todo is None else math.ceil(todo / sl.micro_batch_size),  # type: ignore[arg-type]
        0,
        "soft labels",
    )
    gen = torch.Generator().manual_seed(cfg.run.seed * 1000 + rank)
    budget = sl.fidelity_positions - int(fid.get("tokens", 0))
    tokens, rounds, t0 = 0, 0, time.perf_counter()
    for row in lockstep(rows):
        rounds += 1
        if row is None:  # this rank is done; the others still gather parameters with it
            teacher.idle_forward()
            continue
        ids, labels = row
        picked = None
        if budget > 0:
            take = min(budget, math.ceil(ids.numel() / FIDELITY_RATE))
            pos = torch.randperm(ids.numel(), generator=gen)[:take]  # flat positions in [b * L]
            picked = PickedRows(pos)
        # The teacher's head makes the logits one chunk of rows at a time; each is encoded (and its
        # fidelity rows copied to the host) and dropped: no [b, L, V] tensor.
        writer.add_teacher(teacher, ids, labels != IGNORE_INDEX, None if picked is None else picked.observe)
        if picked is not None:
            fid = merge_fidelity([fid, fidelity(picked.rows, meta)])  # [take, V] on the host
            budget -= take
        tokens += ids.numel()
        monitor.advance({"tokens": str(tokens)})  # records_written only moves when a shard is committed
        if rounds % 10 == 0:
            monitor.scalars(rounds, {"perf/tokens_per_s": tokens / (time.perf_counter() - t0)})
    writer.close()
    atomic_write(fid_path, json.dumps(fid))
    elapsed = time.perf_counter() - t0
    total_tokens = engine.all_reduce_values([tokens])[0]
    slowest = engine.all_reduce_values([elapsed], dist.ReduceOp.MAX)[0]
    parts: list[dict] = [{} for _ in range(world)]
    dist.all_gather_object(parts, fid)  # also the barrier finalize needs: every rank has closed
    fid_all = merge_fidelity(parts)
    if rank == 0:
        finalize_soft_labels(out, world, fid_all)
    dist.barrier()
    manifest = json.loads((out / "manifest.json").read_text())
    summary = {
        "dir": str(out),
        "records": manifest["total_records"],
        "shards": len(manifest["shards"]),
        "bytes": sum(s["bytes"] for s in manifest["shards"]),
        "bytes_per_token": manifest["meta"]["bytes_per_token"],
        "encoding": manifest["meta"]["encoding"],
        "fidelity": fid_all,
        "tokens_this_run": int(total_tokens),
        "tokens_per_s": total_tokens / slowest if total_tokens else 0.0,
    }
    monitor.scalars(
        rounds,
        {
            "fidelity/topk_mass": fid_all["topk_mass"],
            "fidelity/topk_mass_min": fid_all["topk_mass_min"],
            **({} if fid_all["kl"] is None else {"fidelity/kl_nats": fid_all["kl"]}),
            "fidelity/positions": fid_all["tokens"],
            "perf/tokens_per_s": summary["tokens_per_s"],
            "soft_labels/records": summary["records"],
            "soft_labels/bytes_per_token": summary["bytes_per_token"],
        },
    )
    monitor.print(
        f"[soft_labels] {summary['records']} sequences in {summary['shards']} shards -> {out}; "
        f"{sl.encoding}: {summary['bytes_per_token']:.1f} bytes/token, kept mass {fid_all['topk_mass']:.4f}"
        + ("" if fid_all["kl"] is None else f", KL {fid_all['kl']:.4g} nats")
        + f" ({int(fid_all['tokens'])} positions)"
    )
    if fid_all["tokens"] and (warning := low_mass_warning(sl.encoding, fid_all["topk_mass"])):
        monitor.print(warning)
    monitor.close()
    return summary


def candidate_contexts(cfg: ExperimentConfig, tokenizer) -> list[Context]:
    """Every context of the run (ids, gold ids, gold is a reference), the same list on every rank
    (data_pipeline/contexts.py)."""
    sl = cfg.soft_labels
    if cfg.data.paths:
        # EOS + context + continuation within the positions the teacher trained on
        room = cfg.data.seq_len - sl.max_new_tokens - 1
        if room < 1:
            raise ConfigError(
                f"soft_labels.max_new_tokens {sl.max_new_tokens} leaves no room for a context in data.seq_len {cfg.data.seq_len}"
            )
        return document_contexts(
            rundir.train_files(cfg), tokenizer, sl.candidate_contexts, room, sl.candidate_tasks_only
        )
    people, _ = bios.load_truth(cfg.run_dir / "data" / "truth.json")
    contexts = tokenize_contexts(tokenizer, bios_contexts(people, sl.candidate_contexts, cfg.run.seed))
    room = max(1, cfg.data.seq_len - sl.max_new_tokens)
    # Context + continuation within the positions the teacher trained on: keep a context's last `room` ids.
    return [c._replace(context=c.context[-room:]) for c in contexts]


def sample_candidates(cfg: ExperimentConfig, teacher: ShardedTeacher) -> dict:
    """Write this rank's candidate groups (contexts rank, rank + world, ...); rank 0 finalizes. Returns a summary.

    One generate call per max(1, generate_batch_size // M) contexts, each context repeated M times
    ([contexts × M, width] rows, left-padded). Ranks with fewer calls run idle one-token generates so
    the number of calls matches (synced_gpus needs that).
    """
    sl, rank, world = cfg.soft_labels, dist.get_rank(), dist.get_world_size()
    tok = teacher.tokenizer
    out = rundir.stage_dir(cfg, "soft_labels") / "candidates"
    contexts = candidate_contexts(cfg, tok)
    if not contexts:
        raise ConfigError(
            "soft_labels.candidates: the corpus gave no context (documents of >= 2 tokens"
            + (", task records with soft_labels.candidate_tasks_only)" if sl.candidate_tasks_only else ")")
        )
    M, T = sl.candidates_per_context, sl.max_new_tokens
    meta = candidate_meta(
        teacher.checkpoint_id, tokenizer_hash(models.tokenizer_dir(cfg)), teacher.vocab_size, M, T,
        sl.sample_temperature, sl.top_p, max(len(c.context) for c in contexts), gold=sl.include_gold,
    )  # fmt: skip
    writer = CandidateWriter(out, rank, meta, sl.records_per_shard, world_size=world)
    mine = contexts[rank::world]
    todo = [] if writer.final else list(range(writer.records_written, len(mine)))
    per_call = max(1, sl.generate_batch_size // M)
    calls = [todo[i : i + per_call] for i in range(0, len(todo), per_call)]
    bar = tqdm(total=len(calls), desc="candidates", disable=rank != 0, dynamic_ncols=True)
    new_tokens, t0 = 0, time.perf_counter()
    for call in lockstep(calls):
        if call is None:
            teacher.idle_generate()
            continue
        ctx = [mine[j].context for j in call]
        width = max(map(len, ctx))
        ids = torch.tensor([[pad_id(tok)] * (width - len(c)) + c for c in ctx])  # [b, W] left-padded
        mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(c) for c in ctx])[:, None]).long()
        # Seeded by the call's first context, not by the history: a resumed run whose calls start at the
        # same contexts (records_per_shard a multiple of contexts per call) draws the same samples.
        torch.manual_seed(cfg.run.seed * 1_000_003 + rank * 10_007 + call[0])
        seqs = teacher.generate(
            ids.repeat_interleave(M, 0),  # [b * M, W]: context b's rows are b*M .. b*M + M-1
            mask.repeat_interleave(M, 0),
            do_sample=True,
            temperature=sl.sample_temperature,
            top_p=sl.top_p,
            top_k=0,  # generate's default top_k=50 would cut the distribution before top_p
            max_new_tokens=T,
        )
        cand, lens = trim_generated(seqs[:, width:].cpu(), tok.eos_token_id, T)  # [b * M, T], [b * M]
        groups = []
        for b, j in enumerate(call):
            rows = [cand[b * M + m, : lens[b * M + m]].tolist() for m in range(M)]
            groups.append(rows + [mine[j].gold] if sl.include_gold else rows)
        references = [sl.include_gold and mine[j].reference for j in call]
        writer.add_groups(**pack_groups(ctx, groups, meta["ctx_len"], T, references))
        new_tokens += int(lens.sum())
        bar.update(1)
    bar.close()
    writer.close()
    elapsed = engine.all_reduce_values([time.perf_counter() - t0], dist.ReduceOp.MAX)[0]
    new_tokens = int(engine.all_reduce_values([new_tokens])[0])
    dist.barrier()  # every rank has closed
    if rank == 0:
        finalize(out, world)
    dist.barrier()
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        "dir": str(out),
        "groups": manifest["total_records"],
        "group_size": M + int(sl.include_gold),
        "sampled_tokens_this_run": new_tokens,
        "sampled_tokens_per_s": new_tokens / elapsed if new_tokens else 0.0,
    }


def run(cfg: ExperimentConfig) -> ShardedTeacher:
    """The stage on every rank; returns the loaded teacher for callers that keep using it in the same job."""
    rank, _ = engine.setup_distributed(cfg.launch.threads_per_rank, cfg.launch.timeout_s)
    teacher = artifacts.sharded_teacher(cfg)
    if rank == 0:
        tqdm.write(
            f"[soft_labels] teacher {teacher.checkpoint_id} loaded from its ZeRO shards (tag {teacher.tag})"
        )
    produced = {"teacher_checkpoint": teacher.checkpoint_id, "soft_labels": label_stream(cfg, teacher)}
    if cfg.soft_labels.candidates:
        produced["candidates"] = sample_candidates(cfg, teacher)
    if rank == 0:
        marker = read_marker(rundir.ckpt_dir(cfg, "teacher")) or {}
        inputs = {
            "teacher_checkpoint": teacher.checkpoint_id,
            "teacher_config_hash": marker.get("config_hash"),
            "tokenizer_hash": tokenizer_hash(models.tokenizer_dir(cfg)),
            "train_files": [str(f) for f in rundir.train_files(cfg)],
        }
        done.write_done(cfg, "soft_labels", produced, inputs)
    dist.barrier()
    return teacher
