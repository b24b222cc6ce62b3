"""Stage `soft_labels` (launcher/stages/soft_labels.py, model/sharded_teacher.py, data_pipeline/{online,contexts}.py).

One DeepSpeed launch of its own (module fixture `run`): tests/soft_labels_worker.py (the soft_labels stage on
2 ranks + online-vs-offline on the same batch) from the conftest `upstream` teacher (tiny Llama, ZeRO-3, fp32,
2 ranks).
The rest checks their output in this process: against the teacher consolidated with DeepSpeed's own
`zero_to_fp32` and run in plain PyTorch, the training stream, the reader and the candidate format.

Tolerance of the equivalence (teacher.dtype=fp32): ZeRO-3 and the plain model compute the same fp32
logits up to summation order (~1e-6); the shards store float16 log-probs, whose rounding is at most half
an ulp (2^-11 relative). So |stored - reference| <= 1e-4 + 2^-10 * |reference|, and ids must match
except where two reference log-probs are within that tolerance of each other (a tie may swap them).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as stnp
import torch

from stablekd.data_pipeline.candidates import candidate_reader, group_size
from stablekd.data_pipeline.contexts import bios_contexts, document_contexts, tokenize_contexts
from stablekd.data_pipeline.encodings import Decoded
from stablekd.data_pipeline.online import OnlineSoftLabels, lockstep
from stablekd.data_pipeline.shards.loader import ShardLoader
from stablekd.data_pipeline.shards.manifest import read_manifest
from stablekd.data_pipeline.soft_labels import (
    SoftLabelWriter,
    finalize_soft_labels,
    soft_label_meta,
    soft_label_reader,
)
from stablekd.data_pipeline.stream import PackedStream
from stablekd.data_pipeline.tokenizer import load_tokenizer, tokenizer_hash
from stablekd.launcher import done, models, rundir
from stablekd.launcher.config import ConfigError, load_config
from stablekd.launcher.driver import cli, preflight, prepare
from stablekd.launcher.stages import NAMES
from stablekd.model.build import build_model
from tests.conftest import UPSTREAM, copy_run, launch_script, run_group

ROOT = Path(__file__).resolve().parent.parent
ATOL, RTOL = 1e-4, 2.0**-10  # see the module docstring
OLD_TAG, TAG = "step0000003", "step0000006"  # the upstream teacher's checkpoints

SOFT = [
    "soft_labels.encoding=topk",  # compared value by value with a plain teacher: float16 log-probs
    "soft_labels.logprob_bits=16",
    "soft_labels.k=8",
    "soft_labels.temperature=2.0",
    "soft_labels.max_sequences=5",  # 3 + 2 sequences, batches of 2: rank 0 runs 2 forwards, rank 1 one
    "soft_labels.micro_batch_size=2",
    "soft_labels.generate_batch_size=2",  # 2 rows // M = 1 context per generate call
    "soft_labels.records_per_shard=2",
    "soft_labels.fidelity_positions=50",
    "soft_labels.candidate_contexts=5",  # 3 + 2 contexts: 3 generate calls on rank 0, 2 on rank 1
    "soft_labels.candidates_per_context=2",
    "soft_labels.max_new_tokens=6",
]


@pytest.fixture(scope="module")
def run(upstream, tmp_path_factory):
    """(cfg, per-rank worker results) after the soft_labels stage on 2 ranks (tests/soft_labels_worker.py) from
    the conftest `upstream` teacher (tiny Llama, ZeRO-3, fp32, 2 ranks), its own soft labels removed."""
    out = copy_run(upstream, tmp_path_factory.mktemp("sl") / "run")
    shutil.rmtree(out / "soft_labels")
    overrides = [f"run.out_dir={out}", *UPSTREAM, *SOFT]
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", overrides)
    ckpt = cfg.run_dir / "teacher" / "ckpt"
    assert sorted(p.name for p in ckpt.glob("step*")) == [OLD_TAG, TAG]  # teacher.save_every=3, 6 steps
    # A `latest` naming the older tag: DeepSpeed falls back on it in some load paths; the
    # stage must load the tag complete.json names, which the equivalence test below checks.
    (ckpt / "latest").write_text(OLD_TAG)

    prepare.prepare(cfg, ["soft_labels"])  # what `stablekd stage soft_labels` does before launching
    preflight.soft_labels(cfg)  # as pipeline.run does before starting the ranks
    result = out.parent / "worker.json"
    cmd = launch_script(ROOT / "tests" / "soft_labels_worker.py", str(cfg.run_dir), str(result))
    proc = run_group(cmd, 600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return cfg, json.loads(result.read_text())


def _records(directory: Path, reader_fn) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "state"} for r in reader_fn(directory)]


# --------------------------------------------------------------------------------- 2-rank launches


@pytest.mark.distributed
def test_stage_outputs(run):
    cfg, _ = run
    out = cfg.run_dir / "soft_labels"
    tok_dir = models.tokenizer_dir(cfg)
    m = read_manifest(
        out, "soft_labels", {"tokenizer_hash": tokenizer_hash(tok_dir), "k": 8, "temperature": 2.0}
    )
    assert m["meta"]["teacher_checkpoint"] == f"teacher/ckpt/{TAG}"
    assert m["meta"]["seq_len"] == 32 and m["meta"]["vocab_size"] == 400
    assert m["schema"]["topk_ids"]["dtype"] == "uint16" and m["schema"]["topk_logprobs"]["dtype"] == "float16"
    assert m["total_records"] == 5 and m["writer_world_size"] == 2
    size = sum(s["bytes"] for s in m["shards"])
    assert m["meta"]["bytes_per_token"] == pytest.approx(size / (5 * 32)) and m["meta"]["encoding"] == "topk"
    fid = m["meta"]["fidelity"]
    assert 0 < fid["topk_mass_min"] <= fid["topk_mass"] <= 1 and fid["kl"] >= 0
    # One position in 8 of each batch: rank 0 batches of 2 and 1 rows (8 + 4), rank 1 one of 2 rows (8).
    assert fid["tokens"] == 8 + 4 + 8
    assert list((cfg.run_dir / "tb" / "soft_labels").glob("events.out.tfevents.*"))
    assert done.is_done(cfg, "soft_labels")
    record = json.loads((out / "DONE.json").read_text())
    assert (
        record["produced"]["soft_labels"]["records"] == 5 and record["produced"]["candidates"]["groups"] == 5
    )
    assert not list(out.glob("*.tmp"))


@pytest.mark.distributed
def test_equals_consolidated_teacher(run):
    """Top-k of the 2-rank ZeRO-3 teacher == top-k of DeepSpeed's zero_to_fp32 consolidation run in one plain process."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    cfg, _ = run
    ckpt = cfg.run_dir / "teacher" / "ckpt"
    tag = json.loads((ckpt / "complete.json").read_text())["tag"]
    tok = load_tokenizer(models.tokenizer_dir(cfg))
    model = build_model(
        "tiny", tok, cfg.data.seq_len, seed=12345
    )  # other init: all weights come from the load
    model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag))
    model.eval()

    recs = _records(cfg.run_dir / "soft_labels", lambda d: soft_label_reader(d))
    ids = torch.stack([r["input_ids"] for r in recs]).long()  # [N, L]
    stored_ids = torch.stack([r["topk_ids"] for r in recs]).long()  # [N, L, k]
    stored_lp = torch.stack([r["topk_logprobs"] for r in recs]).float()  # [N, L, k]
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=ids).logits.float() / 2.0, dim=-1)  # [N, L, V]
    ref_vals, ref_ids = ref.topk(8, dim=-1)  # [N, L, k]
    tol = ATOL + RTOL * ref_vals.abs()

    at_stored = ref.gather(-1, stored_ids)  # reference log-prob of each stored id
    assert (stored_lp - at_stored).abs().le(tol).all(), (stored_lp - at_stored).abs().max()
    assert (stored_lp - ref_vals).abs().le(tol).all()  # same values rank by rank: a true top-k
    swapped = stored_ids != ref_ids
    assert ((at_stored - ref_vals).abs()[swapped] <= tol[swapped]).all()  # ids differ only at ties
    assert swapped.float().mean() < 0.05
    # Weights of the other tag (the one `latest` names) give other log-probs: the load took TAG.
    old = build_model("tiny", tok, cfg.data.seq_len, seed=12345)
    old.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=OLD_TAG))
    with torch.no_grad():
        ref_old = torch.log_softmax(old(input_ids=ids).logits.float() / 2.0, dim=-1)
    assert (ref_old.gather(-1, stored_ids) - stored_lp).abs().max() > 1e-3


@pytest.mark.distributed
def test_labels_follow_training_stream(run):
    """Rank r labelled the first rows of its own training stream shard (3 on rank 0, 2 on rank 1)."""
    cfg, _ = run
    out = cfg.run_dir / "soft_labels"
    m = read_manifest(out)
    for rank, n in ((0, 3), (1, 2)):
        files = [s["file"] for s in m["shards"] if s["rank"] == rank]
        written = np.concatenate([stnp.load_file(out / f)["input_ids"] for f in files])
        stream = PackedStream(rundir.train_files(cfg), models.tokenizer_dir(cfg), 32, 2, rank, 2, loop=False)
        rows = torch.cat([b["input_ids"] for b in stream])[:n]
        assert written.shape == (n, 32)
        assert np.array_equal(written, rows.numpy())


@pytest.mark.distributed
def test_reader_covers_shards_over_consumer_ranks(run):
    cfg, _ = run
    out = cfg.run_dir / "soft_labels"
    everything = sorted(tuple(r["input_ids"].tolist()) for r in _records(out, lambda d: soft_label_reader(d)))
    for consumers in (1, 2, 3):
        got = []
        for rank in range(consumers):
            for batch in ShardLoader(soft_label_reader(out, rank=rank, world_size=consumers), 2):
                got += [tuple(row.tolist()) for row in batch["input_ids"]]
        assert sorted(got) == everything  # disjoint and complete
    # Resume: a new loader from the state after one batch continues with the rest.
    first = ShardLoader(soft_label_reader(out, rank=0, world_size=1), 2)
    seen = [tuple(r.tolist()) for r in next(iter(first))["input_ids"]]
    second = ShardLoader(soft_label_reader(out, rank=0, world_size=1), 2)
    second.load_state_dict(first.state_dict())
    seen += [tuple(r.tolist()) for b in second for r in b["input_ids"]]
    assert sorted(seen) == everything


@pytest.mark.distributed
def test_online_equals_offline(run):
    _, parts = run
    assert [p["rank"] for p in parts] == [0, 1]
    for p in parts:
        assert p["keys"][0] == p["keys"][1] == ["input_ids", "loss_mask", "topk_ids", "topk_logprobs"]
        assert p["dtypes"][0] == p["dtypes"][1] and p["shapes"][0] == p["shapes"][1]
        assert p["shapes"][0]["topk_ids"] == [2, 32, 8]
        assert p["input_ids_equal"] and p["topk_ids_equal"]
        assert p["logprobs_max_abs_diff"] == 0.0  # same ranks, same batch, same kernels: bit-identical
        assert p["online_state"]["online"] and p["online_state"]["stream"]["rank"] == p["rank"]


@pytest.mark.distributed
def test_candidates(run):
    cfg, _ = run
    out = cfg.run_dir / "soft_labels" / "candidates"
    m = read_manifest(out, "candidates")
    meta = m["meta"]
    assert meta["m"] == 2 and meta["gold"] and meta["max_new_tokens"] == 6
    assert meta["teacher_checkpoint"] == f"teacher/ckpt/{TAG}"
    assert m["total_records"] == 5
    per_rank = {r: sum(s["records"] for s in m["shards"] if s["rank"] == r) for r in (0, 1)}
    assert per_rank == {0: 3, 1: 2}  # uneven: the generate calls were padded, no deadlock
    # Records of writer rank r are contexts r, r + 2, ... of the run's context list, gold last.
    tok = load_tokenizer(models.tokenizer_dir(cfg))
    from stablekd.launcher.stages.soft_labels import candidate_contexts

    contexts = candidate_contexts(cfg, tok)
    G, C = group_size(meta), meta["ctx_len"]
    for rank in (0, 1):
        files = [s["file"] for s in m["shards"] if s["rank"] == rank]
        arr = {
            k: np.concatenate([stnp.load_file(out / f)[k] for f in files])
            for k in ("context_ids", "context_len", "cand_ids", "cand_len", "reference")
        }
        for i, (ctx, gold, ref) in enumerate(contexts[rank::2]):
            assert arr["context_len"][i] == len(ctx) and arr["context_ids"][i, C - len(ctx) :].tolist() == ctx
            assert arr["reference"][i] == ref  # the gold row is a reference answer (a bios question's truth)
            assert arr["cand_ids"].shape[1:] == (G, 6)
            assert arr["cand_ids"][i, G - 1, : arr["cand_len"][i, G - 1]].tolist() == gold[:6]
            assert ((arr["cand_len"][i] >= 1) & (arr["cand_len"][i] <= 6)).all()
            assert arr["cand_ids"][i].max() < 400
    assert len(list(candidate_reader(out))) == 5


# ----------------------------------------------------------------------------------- no launches


def test_stage_is_registered():
    assert NAMES.index("soft_labels") == NAMES.index("teacher") + 1
    assert cli._parser().parse_args(["stage", "soft_labels", "c.yaml"]).name == "soft_labels"


def test_world_size_mismatch_says_what_to_run(tmp_path):
    from stablekd.model.sharded_teacher import inference_ds_config
    from stablekd.model.teacher_checkpoint import checkpoint_source

    ckpt = tmp_path / "ckpt"
    with pytest.raises(ConfigError, match="complete.json: missing"):
        checkpoint_source(ckpt, 2)
    (ckpt / "step0000010").mkdir(parents=True)
    (ckpt / "complete.json").write_text(json.dumps({"tag": "step0000010", "step": 10, "world_size": 2}))
    assert checkpoint_source(ckpt, 2)[1:] == ("step0000010", False)
    with pytest.raises(ConfigError) as e:
        checkpoint_source(ckpt, 3)
    msg = str(e.value)
    assert "2 ranks" in msg and "3 ranks" in msg
    assert "converts it once to step0000010_universal" in msg
    (ckpt / "step0000010_universal" / "zero").mkdir(parents=True)
    assert checkpoint_source(ckpt, 3)[1:] == ("step0000010_universal", True)

    ds = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
          "tensorboard": {"enabled": True}, "zero_optimization": {"stage": 3}}  # fmt: skip
    inf = inference_ds_config(ds, 3, universal=True)
    assert inf["train_batch_size"] == 24 and "tensorboard" not in inf
    assert inf["checkpoint"] == {"load_universal": True} and ds["train_batch_size"] == 16


def test_preflight_without_teacher(tmp_path):
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [f"run.out_dir={tmp_path}"])
    with pytest.raises(ConfigError) as e:
        preflight.soft_labels(cfg)
    assert str(e.value) == (
        f"{tmp_path / 'teacher' / 'ckpt'}/complete.json: missing: no complete teacher checkpoint; "
        f"run `stablekd stage teacher {tmp_path / 'config.yaml'}` to finish it"
    )


def test_rank_quota_and_rows():
    from stablekd.launcher.stages.soft_labels import _rows, rank_quota

    assert [rank_quota(5, r, 2) for r in (0, 1)] == [3, 2]
    assert rank_quota(0, 0, 2) is None
    rows = [torch.arange(i * 3, i * 3 + 3)[:, None] for i in range(4)]  # rows 0..11
    batches = [{"input_ids": r, "labels": -r} for r in rows]
    got = list(_rows(batches, 4, 10))
    assert torch.cat([ids for ids, _ in got]).flatten().tolist() == list(range(4, 10))
    assert torch.cat([labels for _, labels in got]).flatten().tolist() == [-i for i in range(4, 10)]
    assert torch.cat([ids for ids, _ in _rows(batches, 0, None)]).flatten().tolist() == list(range(12))


def test_lockstep_without_process_group():
    assert list(lockstep([1, 2])) == [1, 2]
    assert list(lockstep([])) == []


class _PlainTeacher:
    """The online source's teacher interface over a plain model (one process, nothing partitioned)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.vocab_size, self.idle = model, model.config.vocab_size, 0

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(input_ids=input_ids).logits

    def head(self, input_ids: torch.Tensor, head_loss) -> torch.Tensor:
        with torch.no_grad():
            return self.model(input_ids=input_ids, head_loss=head_loss)[0]

    def idle_forward(self) -> None:
        self.idle += 1


class _Batches:
    def __init__(self, batches: list[dict]) -> None:
        self.batches, self.pos = batches, 0

    def __iter__(self):
        while self.pos < len(self.batches):
            self.pos += 1
            yield self.batches[self.pos - 1]

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


@pytest.mark.parametrize(
    "encoding",
    [{"encoding": "topk", "logprob_bits": 16}, {"encoding": "topp", "mean_entries": 2, "logprob_bits": 8}],
)
def test_online_source_stores_what_the_writer_stores(tmp_path, encoding):
    """Same logits -> the online batch equals the offline record bit for bit (cast, clip, widening)."""
    tok_dir = tmp_path / "tok"
    from stablekd.data_pipeline.tokenizer import train_tokenizer

    texts = [f"person {i} was born in city {i % 7} and works at firm {i % 5}." for i in range(200)]
    train_tokenizer(texts, 320, tok_dir)
    tok = load_tokenizer(tok_dir)
    model = build_model("tiny", tok, 16, seed=0).eval()
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, V, (3, 16), generator=g)} for _ in range(2)]
    for b in batches:  # a task record's prompt: its first tokens are context, not learned
        b["labels"] = b["input_ids"].masked_fill(torch.arange(16) < 5, -100)
    teacher = _PlainTeacher(model)
    meta = soft_label_meta("x", "h", V, 0.5, 16, k=5, **encoding)
    online = OnlineSoftLabels(_Batches(batches), teacher, meta)
    got = list(online)
    assert online.state_dict() == {"online": True, "stream": {"pos": 2}}

    w = SoftLabelWriter(tmp_path / "sl", 0, meta, records_per_shard=4)
    for b in batches:
        w.add_logits(b["input_ids"], teacher.logits(b["input_ids"]), b["labels"] != -100)
    w.close()
    finalize_soft_labels(tmp_path / "sl", 1)
    offline = list(Decoded(ShardLoader(soft_label_reader(tmp_path / "sl"), 3), meta))
    for a, b in zip(got, offline, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    again = OnlineSoftLabels(_Batches(batches), teacher, meta)
    again.load_state_dict({"online": True, "stream": {"pos": 1}})
    assert len(list(again)) == 1
    with pytest.raises(ValueError, match="offline"):
        again.load_state_dict({"positions": []})


def test_bios_contexts_are_true_continuations():
    from stablekd.data_pipeline import bios

    corpus = bios.generate(5, 1, 0, 0, seed=1)
    pairs = bios_contexts(corpus.people, 12, seed=3)
    assert pairs == bios_contexts(corpus.people, 12, seed=3)  # deterministic
    names = {p.name: p for p in corpus.people}
    for i, (prompt, gold, question) in enumerate(pairs):
        person = next(p for n, p in names.items() if n in prompt)
        text = prompt + gold
        found = bios.extract_attributes(text, person.name)
        assert all(vals == [person.value(a)] for a, vals in found.items()), text  # each attribute, truly
        if i % 4 == 3:
            assert prompt == person.name and not question  # a biography start: no reference answer
        else:
            assert gold.startswith(" ") and question


def test_tokenized_contexts(tmp_path):
    from stablekd.data_pipeline.tokenizer import train_tokenizer

    docs = [f"Document number {i} talks about topic {i % 3} at some length." for i in range(100)]
    train_tokenizer(docs, 300, tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    (tmp_path / "c.txt").write_text("\n".join(docs[:4]) + "\n")
    eos = tok.eos_token_id
    for ctx, gold, ref in tokenize_contexts(tok, [("Document number 7", " talks about topic 1.", True)]):
        assert ctx[0] == eos and gold[-1] == eos and ref
        assert tok.decode(ctx[1:] + gold[:-1]) == "Document number 7 talks about topic 1."
    got = document_contexts([tmp_path / "c.txt"], tok, 3, max_context=5)
    assert len(got) == 3
    for ctx, gold, ref in got:
        assert ctx[0] == eos and 2 <= len(ctx) <= 6 and gold[-1] == eos and not ref  # prose: no reference


@pytest.mark.distributed
def test_low_kept_mass_is_said_once_naming_the_sampled_encoding(upstream):
    from stablekd.launcher.stages.soft_labels import LOW_MASS, low_mass_warning

    fid = read_manifest(upstream / "soft_labels", "soft_labels")["meta"]["fidelity"]
    assert fid["topk_mass"] < LOW_MASS  # a 6-step teacher: its top-8 of 400 ids keep little of its mass
    log = (upstream / "logs" / "soft_labels.log").read_text()
    assert log.count(low_mass_warning("topk", fid["topk_mass"])) == 1
    assert "soft_labels.encoding=sampled" in low_mass_warning("topp", 0.5)
    assert low_mass_warning("topk", LOW_MASS) is None and low_mass_warning("sampled", 0.1) is None
