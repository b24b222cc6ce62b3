"""Stage `distill` (launcher/stages/distill.py) on real 2-rank DeepSpeed launches through the CLI.

Launches: the tiny teacher and its soft labels (conftest `upstream`), a 16-step ZeRO-3 distillation (conftest
`distilled`); a ZeRO-2 student with a tokenizer of its own (cross-tokenizer, conftest `xtok_distilled`; both
students are fine-tuned again by tests/test_contrastive_stage.py) and an on-policy student (λ = 0.5: the ZeRO-3 teacher
in the job scores its samples and labels the other micro-batches online), each killed with SIGKILL after a
checkpoint and rerun and compared with a plain single-process loop (the resume of the reader position is checked there, on the batches that
wrap the same reader).

Checked against a plain single-process loop (`reference_losses`): the same student, AdamW, schedule and
clipping, fed what each rank reads from the shards. The shards are uneven on purpose (7 sequences, one
per shard: consumer rank 0 holds 4, rank 1 holds 3), so every epoch is 3 micro-batches on both ranks
(data_pipeline/epochs.py) and a step's global batch is both ranks' micro-batches. Tolerance rel 2e-4 as
for the teacher (fp32; the ranks' gradient sums differ from one process's only in summation order).
"""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.lr_schedules import WarmupCosineLR
from transformers import AutoModelForCausalLM, AutoTokenizer

from stablekd.data_pipeline.align import TOKEN_BYTES_FILE, Aligner, TokenBytes, realign_batch
from stablekd.data_pipeline.on_policy import OnPolicy, is_on_policy
from stablekd.data_pipeline.online import OnlineSoftLabels
from stablekd.data_pipeline.shards.loader import ShardLoader
from stablekd.data_pipeline.soft_labels import config_meta, soft_label_reader
from stablekd.data_pipeline.stream import PackedStream, StreamLoader
from stablekd.data_pipeline.tokenizer import load_tokenizer
from stablekd.launcher import rundir
from stablekd.launcher.config import ConfigError, load_config
from stablekd.launcher.driver import preflight
from stablekd.launcher.rank import distill_parts
from stablekd.launcher.rank.monitor import read_scalars
from stablekd.model.build import build_model
from stablekd.model.head import HeadRows, last_hidden
from stablekd.objectives.cross_tokenizer import cross_kd_sum
from stablekd.objectives.kd import kd_sum, soft_label_counts
from stablekd.objectives.kd_losses import ON_POLICY, cross_counts, on_policy_counts
from stablekd.objectives.lm import nll_sum
from tests.conftest import (
    DISTILL,
    QUICKSTART,
    REPO,
    UPSTREAM,
    copy_run,
    distill_args,
    kill_after_checkpoint,
    run_stablekd,
    stablekd_cmd,
)

pytestmark = pytest.mark.distributed


def reference_losses(run: Path, steps: int, student_tok: Path | None = None) -> list[float]:
    """One process: the student trained on both ranks' shard batches per step (epochs of min(4, 3) = 3).
    With `student_tok` (a student with its own tokenizer) the batches are realigned for it and the loss is
    the cross-tokenizer one. With distill.on_policy, rank r's on-policy micro-batch i is the plain student's
    sample from that record with rank r's seed (data_pipeline/on_policy.py), scored by the teacher
    consolidated from its ZeRO-3 checkpoint; with distill.online that teacher also labels each rank's
    stream (the job's classes, a plain teacher). Each term is divided by its own count over the step, as
    the loop does."""
    cfg = load_config(run / "config.yaml")
    d = cfg.distill
    per_rank = [list(ShardLoader(soft_label_reader(run / "soft_labels", {}, r, 2), 1)) for r in range(2)]
    epoch = min(map(len, per_rank))
    tok = load_tokenizer(student_tok or run / "tokenizer")
    if student_tok is not None:
        aligner = Aligner(TokenBytes.load(run / "soft_labels" / TOKEN_BYTES_FILE), tok, cfg.data.seq_len)
        vmap = torch.from_numpy(aligner.vocab_map)
        per_rank = [[realign_batch(b, aligner) for b in batches] for batches in per_rank]
    model = build_model(cfg.student.model, tok, cfg.data.seq_len, cfg.run.seed)
    if d.on_policy:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        ckpt = run / "teacher" / "ckpt"
        teacher = build_model(cfg.teacher.model, tok, cfg.data.seq_len, seed=12345)  # weights from the load
        tag = json.loads((ckpt / "complete.json").read_text())["tag"]
        teacher.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag))
        sample = distill_parts.sampler(
            model, tok, d.on_policy_new_tokens, d.on_policy_temperature, synced=False
        )
        if (
            d.online
        ):  # each rank's looping stream, labelled by the consolidated teacher as the job's labels it
            plain = PlainTeacher(teacher.eval())
            meta = config_meta(cfg.soft_labels, "", "", len(tok), cfg.data.seq_len)
            per_rank = [
                list(itertools.islice(OnlineSoftLabels(StreamLoader(PackedStream(
                    rundir.train_files(cfg), run / "tokenizer", cfg.data.seq_len, 1, r, 2, cfg.data.num_workers,
                    loop=True)), plain, meta, in_step=False), steps * d.grad_accum))
                for r in range(2)
            ]  # fmt: skip
            epoch = steps * d.grad_accum
        ranks = [
            OnPolicy([], sample, PlainTeacher(teacher.eval()), d.on_policy, d.on_policy_prompt_tokens,
                     cfg.run.seed, r, tok.eos_token_id)
            for r in range(2)
        ]  # fmt: skip
    opt = torch.optim.AdamW(
        model.parameters(), lr=d.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=d.weight_decay
    )
    sched = WarmupCosineLR(
        opt, total_num_steps=d.max_steps, warmup_num_steps=d.warmup_steps, cos_min_ratio=d.min_lr_ratio,
        warmup_type="linear",
    )  # fmt: skip
    losses = []
    for step in range(steps):
        draws = range(step * d.grad_accum, (step + 1) * d.grad_accum)
        batches = [
            ranks[r].scored(per_rank[r][i % epoch], i)
            if is_on_policy(i, d.on_policy, d.on_policy_warmup_steps * d.grad_accum)
            else per_rank[r][i % epoch]
            for r in range(2)
            for i in draws
        ]
        counts = [on_policy_counts(cross_counts if student_tok else soft_label_counts)(b) for b in batches]
        n_kd, n_ce, n_op = (max(1, sum(c.get(t, 0) for c in counts)) for t in ("kd", "ce", ON_POLICY))
        opt.zero_grad()
        loss = 0.0
        for b in batches:
            ids = b["input_ids"].long()
            logits = model(input_ids=ids).logits[..., : len(tok)]
            if "teacher_hidden" in b:  # the reference scores with the teacher's whole logits
                kind = d.on_policy_kind or d.kind
                whole = ranks[0].teacher.logits(ids).detach()
                kd, _ = kd_sum(logits, whole, b["labels"], kind, d.temperature, d.beta)
                (kd / n_op).backward()
                loss += float(kd.detach()) / n_op
                continue
            if student_tok is None:
                teacher = (b["topk_ids"].long(), b["topk_logprobs"])
                kd, _ = kd_sum(logits, teacher, ids, d.kind, d.temperature, d.beta)
                ce, _ = nll_sum(logits, ids)
            else:
                teacher = (b["topk_ids"].long(), b["topk_logprobs"])
                kd, _ = cross_kd_sum(
                    logits, teacher, b["aligned"], d.cross_tokenizer, vmap, d.kind, d.temperature, d.beta,
                    same_next=b["same_next"],
                )  # fmt: skip
                ce, _ = nll_sum(logits, b["labels"])
            step_loss = d.alpha * kd / n_kd + (1 - d.alpha) * ce / n_ce
            step_loss.backward()
            loss += float(step_loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), d.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss)
    return losses


def test_two_ranks_match_plain_pytorch_and_export(distilled):
    tb = distilled / "tb" / "distill"
    curve = read_scalars(tb, "train/loss")
    assert [curve[s] for s in range(1, 17)] == pytest.approx(reference_losses(distilled, 16), rel=2e-4)
    for tag in ("train/kd", "train/ce", "train/top1_agreement", "train/student_topk_mass", "perf/mfu"):
        assert len(read_scalars(tb, tag)) == 16, tag
    mass = read_scalars(tb, "train/student_topk_mass")
    assert 0.0 < mass[1] < mass[16] <= 1.0  # the student moves its mass onto the teacher's top-k
    done = json.loads((distilled / "student" / "DONE.json").read_text())["produced"]
    assert done["steps"] == 16 and done["world_size"] == 2 and done["zero_stage"] == 3
    # Plain transformers loads the export and generates.
    hf = distilled / "student" / "hf"
    model, tok = AutoModelForCausalLM.from_pretrained(hf), AutoTokenizer.from_pretrained(hf)
    assert model.num_parameters() == done["params"]
    ids = tok(["Anna was born"], return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, ids.shape[1] + 5)


def test_student_rows_padded_pass_too_few_refused_and_labels_of_another_tokenizer_refused(upstream, tmp_path):
    cfg = load_config(QUICKSTART, [f"run.out_dir={upstream}", *UPSTREAM, *DISTILL])
    tok = load_tokenizer(upstream / "tokenizer")
    for rows in (len(tok) + 16, len(tok) - 16):
        model = build_model("tiny-student", tok, 32, 0)
        model.resize_token_embeddings(rows)
        model.save_pretrained(tmp_path / str(rows))
        cfg.student.model = str(tmp_path / str(rows))
        if rows > len(tok):
            preflight.distill(cfg)  # a padded vocabulary: its extra rows never count
            continue
        with pytest.raises(
            ConfigError, match=rf"{rows} embedding rows, but its tokenizer .* has {len(tok)} ids"
        ):
            preflight.distill(cfg)
    cfg.student.model = "tiny-student"
    manifest = upstream / "soft_labels" / "manifest.json"
    text = manifest.read_text()
    try:  # soft labels written with another tokenizer (its hash in the manifest)
        meta = json.loads(text)
        meta["meta"]["tokenizer_hash"] = "0" * 64
        manifest.write_text(json.dumps(meta))
        with pytest.raises(
            ConfigError,
            match=rf"manifest.json: soft labels of a tokenizer with {len(tok)} ids \(hash 000000000000\)",
        ):
            preflight.distill(cfg)
    finally:
        manifest.write_text(text)
    cfg.student.model, cfg.distill.temperature = "tiny-student", 1.0
    with pytest.raises(ConfigError, match="distill.temperature 1.0 != soft_labels.temperature 2.0"):
        preflight.distill(cfg)


def test_a_student_with_another_tokenizer_resumes_after_a_kill_on_the_plain_pytorch_curve(xtok_distilled):
    """A Llama student with a byte-level BPE tokenizer of its own learns from the SentencePiece teacher's
    soft labels (hybrid); killed after a checkpoint and rerun (conftest `xtok_distilled`), its whole curve
    (both launches) is that of a plain single-process loop on the same realigned batches: the same aligned
    positions after the resume. A ZeRO-2 student this time (the other distill launches are ZeRO-3)."""
    x = xtok_distilled
    run, resumed_from, first, out = x.run, x.resumed_from, x.first, x.out
    assert f"at step {resumed_from}" in out.stderr + out.stdout
    after = read_scalars(run / "tb" / "distill", "train/loss")
    curve = [first[s] for s in range(1, resumed_from + 1)] + [after[s] for s in range(resumed_from + 1, 9)]
    assert curve == pytest.approx(reference_losses(run, 8, x.bpe), rel=2e-4)
    share = read_scalars(run / "tb" / "distill", "train/aligned_share")
    assert all(0.2 < v <= 1 for v in share.values())
    done = json.loads((run / "student" / "DONE.json").read_text())
    assert done["produced"]["cross_tokenizer"] == "hybrid"
    exported = AutoTokenizer.from_pretrained(run / "student" / "hf")
    assert (
        len(exported) == 300 and exported.convert_ids_to_tokens(exported("Anna was").input_ids)[0] != "▁Anna"
    )


ON_POLICY_ARGS = [
    "distill.online=true",
    "distill.on_policy=0.5",
    "distill.on_policy_warmup_steps=2",  # λ ramped over 4 micro-batches: 3, 5, 7 of 8 are on-policy, not 1
    "distill.on_policy_prompt_tokens=8",
    "distill.on_policy_new_tokens=8",
    "distill.max_steps=4",
    "distill.save_every=1",
]


class PlainTeacher:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.vocab_size = model.config.vocab_size

    def logits(self, ids: torch.Tensor) -> torch.Tensor:  # the reference's on-policy scoring, whole
        return self.model(input_ids=ids).logits

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:  # on-policy scoring, chunk by chunk
        return last_hidden(self.model, ids)

    def head_rows(self) -> HeadRows:
        return HeadRows(self.model.get_output_embeddings())

    def head(self, ids: torch.Tensor, head_loss) -> torch.Tensor:  # online soft labels, chunk by chunk
        return self.model(input_ids=ids, head_loss=head_loss)[0]


def test_on_policy_with_the_sharded_teacher_matches_plain_pytorch_and_resumes_on_the_same_samples(
    upstream, tmp_path
):
    """λ = 0.5 (`distill.online=true distill.on_policy=0.5`), ramped over the first 2 steps: after those
    every second micro-batch is the ZeRO-3 student's own samples, scored by the ZeRO-3 teacher of the job,
    the others online soft labels. Killed after a
    checkpoint and rerun, the whole curve (both launches) is that of a plain single-process loop that reads
    the same records, samples with the same seeds (seed, micro-batch, rank) and scores with the consolidated
    teacher: the same samples after the resume, the same loss."""
    run = copy_run(upstream, tmp_path / "run")
    proc = subprocess.Popen(
        stablekd_cmd(*distill_args(run, *ON_POLICY_ARGS)), cwd=REPO, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    resumed_from = kill_after_checkpoint(proc, run / "student", 2)
    first = read_scalars(run / "tb" / "distill", "train/loss")
    assert resumed_from < 4
    run_stablekd(*distill_args(run, *ON_POLICY_ARGS))
    tb = run / "tb" / "distill"
    after = read_scalars(tb, "train/loss")
    curve = [first[s] for s in range(1, resumed_from + 1)] + [after[s] for s in range(resumed_from + 1, 5)]
    assert curve == pytest.approx(reference_losses(run, 4), rel=2e-4)
    assert all(1 <= v <= 8 for v in read_scalars(tb, "train/generated_tokens").values())  # 1 row, 8 new
    assert all(v > 0 for v in read_scalars(tb, "train/teacher_s").values())
    done = json.loads((run / "student" / "DONE.json").read_text())["produced"]
    assert done["on_policy"] == 0.5 and done["source"] == "online teacher"
    assert done["teacher_checkpoint"].startswith("teacher/ckpt/")
