"""Stage `contrastive` (launcher/stages/contrastive.py): real 2-rank launches through the CLI, and the
ground-truth judging and no-leakage rules it relies on (no launches).

Launches: from the conftest `distilled` student (tests/test_distill_stage.py's), an 8-step likelihood-scorer
run of a ZeRO-3 student that samples candidates of its own (contrastive.own_samples), the same run killed
with SIGKILL after a checkpoint and rerun, and 2 steps of the embedding scorer with
the SimCTG term. Across tokenizers: from the conftest `xtok_distilled` student (a Llama student with a
byte-level BPE tokenizer of its own, hybrid KD), its 8-step contrastive run (groups re-tokenised, KD anchor
across tokenizers) uninterrupted, then evaluated, and killed and rerun. The 2-rank gather of the InfoNCE loss and its gradients is checked
against one process in tests/test_contrastive_loss.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stablekd.data_pipeline import bios
from stablekd.data_pipeline.contexts import bios_contexts, bios_truth, judge_continuations
from stablekd.data_pipeline.tokenizer import encode, load_tokenizer
from stablekd.evaluation.bios_probe import build_questions
from stablekd.launcher.rank.monitor import read_scalars
from tests import early_launch
from tests.conftest import (
    DISTILL,
    QUICKSTART,
    REPO,
    UPSTREAM,
    XTOK,
    copy_run,
    kill_after_checkpoint,
    run_stablekd,
    stablekd_cmd,
)
from tests.fixed_model import LogitsLM

CONTRASTIVE = [
    "contrastive.max_steps=8",
    "contrastive.micro_batch_size=2",
    "contrastive.negatives=3",
    "contrastive.save_every=2",
    "contrastive.eval_every=0",
    "contrastive.eval_batches=1",
    "contrastive.log_every=1",
    "contrastive.warmup_steps=2",
    "contrastive.dtype=fp32",
]

# The likelihood run and its kill/resume: the student's own samples join the groups (2 per context), sampled
# by a ZeRO-3 student partitioned over the 2 ranks (generate in lockstep)
OWN = ["contrastive.own_samples=2", "contrastive.ds_config=zero3.json"]


def _args(run: Path, *extra: str) -> list[str]:
    return [
        "stage",
        "contrastive",
        str(QUICKSTART),
        f"run.out_dir={run}",
        *UPSTREAM,
        *DISTILL,
        *CONTRASTIVE,
        *extra,
    ]


@early_launch.fixture("distilled")
def tuned(tmp_path_factory, distilled: Path) -> Path:
    run = copy_run(distilled, tmp_path_factory.mktemp("tuned") / "run")
    run_stablekd(*_args(run, *OWN))
    return run


@pytest.mark.distributed
def test_likelihood_run_logs_and_exports(tuned):
    tb = tuned / "tb" / "contrastive"
    for tag in ("train/infonce", "train/lm", "train/pos_sim", "train/neg_sim", "train/acc1", "train/loss"):
        assert len(read_scalars(tb, tag)) == 8, tag
    nce, lm, loss = (read_scalars(tb, t) for t in ("train/infonce", "train/lm", "train/loss"))
    assert all(loss[s] == pytest.approx(nce[s] + 1.0 * lm[s], rel=1e-6) for s in loss)  # lam = 1
    acc = read_scalars(tb, "train/acc1")
    assert all(0.0 <= v <= 1.0 for v in acc.values()) and len(set(acc.values())) > 1  # a real, varying share
    own = read_scalars(tb, "train/own_right")  # the share of its own samples the truth judges right
    assert len(own) == 8 and all(0.0 <= v <= 1.0 for v in own.values())
    done = json.loads((tuned / "contrastive" / "DONE.json").read_text())
    assert done["produced"]["steps"] == 8 and done["produced"]["scorer"] == "likelihood"
    assert done["produced"]["zero_stage"] == 3 and done["produced"]["world_size"] == 2
    assert done["inputs"]["start"].endswith("student/hf")
    model = AutoModelForCausalLM.from_pretrained(tuned / "contrastive" / "hf")
    start = AutoModelForCausalLM.from_pretrained(tuned / "student" / "hf")
    assert model.num_parameters() == start.num_parameters()
    assert any((p - q).abs().max() > 0 for p, q in zip(model.parameters(), start.parameters(), strict=True))


@pytest.mark.distributed
def test_kill_and_resume_continues_the_same_curve(distilled, tuned, tmp_path):
    run = copy_run(distilled, tmp_path / "run")
    proc = subprocess.Popen(
        stablekd_cmd(*_args(run, *OWN)), cwd=REPO, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    resumed_from = kill_after_checkpoint(proc, run / "contrastive", 2)
    assert resumed_from < 8
    out = run_stablekd(*_args(run, *OWN))
    assert f"at step {resumed_from}" in out.stderr + out.stdout
    # Same groups position, LM stream position, own samples, negatives (torch RNG restored), model and optimizer.
    full = read_scalars(tuned / "tb" / "contrastive", "train/loss")
    after = read_scalars(run / "tb" / "contrastive", "train/loss")
    steps = range(resumed_from + 1, 9)
    assert [after[s] for s in steps] == pytest.approx([full[s] for s in steps], rel=1e-5)


@early_launch.fixture("distilled")
def simctg(tmp_path_factory, distilled: Path) -> Path:
    run = copy_run(distilled, tmp_path_factory.mktemp("simctg") / "run")
    extra = [
        "contrastive.scorer=embedding",
        "contrastive.tau=0.1",
        "contrastive.margin=0.5",
        "contrastive.max_steps=2",
    ]
    run_stablekd(*_args(run, *extra))
    return run


@pytest.mark.distributed
def test_embedding_scorer_with_simctg(simctg):
    run = simctg
    tb = run / "tb" / "contrastive"
    sims = read_scalars(tb, "train/pos_sim"), read_scalars(tb, "train/neg_sim")
    assert all(-1.0 <= v <= 1.0 for s in sims for v in s.values())  # cosines
    assert len(read_scalars(tb, "train/simctg")) == 2
    assert (run / "contrastive" / "hf" / "config.json").is_file()


def _xtok(run: Path, student: Path) -> list[str]:
    """The contrastive stage's arguments for a student with its own tokenizer (KD anchor across tokenizers)."""
    return _args(run, f"student.model={student}", *XTOK)


@early_launch.fixture("xtok_distilled")
def xtok_tuned(tmp_path_factory, xtok_distilled: SimpleNamespace) -> Path:
    """`xtok_distilled` after an uninterrupted contrastive stage and the evaluate stage: all five stages."""
    from tests.test_evaluate import EVAL

    run = copy_run(xtok_distilled.run, tmp_path_factory.mktemp("xtok_tuned") / "run")
    run_stablekd(*_xtok(run, xtok_distilled.student))
    run_stablekd("stage", "evaluate", *_xtok(run, xtok_distilled.student)[2:], *EVAL)  # the same arguments
    return run


@pytest.mark.distributed
def test_a_student_with_its_own_tokenizer_is_killed_resumed_and_ends_as_an_uninterrupted_run(
    xtok_distilled, xtok_tuned, tmp_path
):
    """Candidate groups re-tokenised for the student, the KD anchor through the distill stage's hybrid loss
    on realigned soft labels: killed with SIGKILL after a checkpoint and rerun, the curve after the resume
    is that of an uninterrupted run (same groups, same realigned LM batches, same negatives). The
    uninterrupted run's evaluate stage reports the teacher and both students, each in its own tokenizer."""
    student_run, student, full = xtok_distilled.run, xtok_distilled.student, xtok_tuned
    run = copy_run(student_run, tmp_path / "run")
    proc = subprocess.Popen(
        stablekd_cmd(*_xtok(run, student)), cwd=REPO, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    resumed_from = kill_after_checkpoint(proc, run / "contrastive", 2)
    assert resumed_from < 8
    out = run_stablekd(*_xtok(run, student))
    assert f"at step {resumed_from}" in out.stderr + out.stdout
    expected, after = (read_scalars(r / "tb" / "contrastive", "train/loss") for r in (full, run))
    steps = range(resumed_from + 1, 9)
    assert [after[s] for s in steps] == pytest.approx([expected[s] for s in steps], rel=1e-5)
    tb = full / "tb" / "contrastive"
    lm, acc = read_scalars(tb, "train/lm"), read_scalars(tb, "train/acc1")
    assert len(lm) == 8 and all(0 < v < 100 for v in lm.values())  # KD across tokenizers, finite
    assert all(0.0 <= v <= 1.0 for v in acc.values())
    done = json.loads((run / "contrastive" / "DONE.json").read_text())
    assert done["produced"]["steps"] == 8 and done["produced"]["cross_tokenizer"] == "hybrid"
    assert done["inputs"]["student_tokenizer_hash"] != done["inputs"]["tokenizer_hash"]
    assert (
        sum(done["produced"]["labels"]["groups"].values()) == 6
    )  # every context, judged on the teacher's ids
    exported = AutoTokenizer.from_pretrained(run / "contrastive" / "hf")
    assert len(exported) == 300  # the student's own
    model = AutoModelForCausalLM.from_pretrained(run / "contrastive" / "hf")
    start = AutoModelForCausalLM.from_pretrained(student_run / "student" / "hf")
    assert any((p - q).abs().max() > 0 for p, q in zip(model.parameters(), start.parameters(), strict=True))
    # The fifth stage (on the uninterrupted run): the report scores each model in its own tokenizer; bits
    # per byte compare across them.
    scored = json.loads((full / "eval" / "report.json").read_text())["models"]
    assert set(scored) == {"teacher", "student", "contrastive"}
    assert all(0 < scored[m]["bpb"] < 20 and 0 <= scored[m]["bios_accuracy"] <= 1 for m in scored)


# --------------------------------------------------------------------------------------- no launches


def test_contexts_never_ask_what_the_probe_asks():
    """No leakage: training contexts and the report's probe use disjoint question templates, and the
    unseen people are never a context."""
    corpus = bios.generate(30, 2, 1, 10, seed=5)
    contexts = {prompt for prompt, _, _ in bios_contexts(corpus.people, 400, seed=0)}
    probe = {q.prompt for q in build_questions(corpus.people + corpus.unseen, 1000, seed=1)}
    assert contexts and probe and not contexts & probe
    for person in corpus.unseen:
        assert not any(person.name in c for c in contexts)
    assert set(bios.CONTEXT_TEMPLATES).isdisjoint(bios.PROBE_TEMPLATES)


@pytest.mark.distributed  # reads the tiny run's corpus and tokenizer: the teacher's 2-rank launch
def test_judging_marks_contradictions_and_false_negative_keys(upstream):
    tok = load_tokenizer(upstream / "tokenizer")
    people, _ = bios.load_truth(upstream / "data" / "truth.json")
    anna, other = people[0], next(p for p in people[1:] if p.birth_city != people[0].birth_city)
    prompt = bios.probe_prompts(anna, "birth_city")[bios.CONTEXT_TEMPLATES[0]]
    ctx = [tok.eos_token_id, *encode(tok, [prompt])[0]]
    conts = [f" {anna.birth_city}.", f" {other.birth_city}.", " the moon"]
    ids = [encode(tok, [prompt + c])[0][len(ctx) - 1 :] for c in conts]
    verdicts, keys, truth_key, known, asked, rule = judge_continuations(tok, ctx, ids, bios_truth(people))
    assert (
        known and asked == bios.ATTRIBUTES.index("birth_city") and verdicts == [1, -1, 0] and rule == "truth"
    )  # true, a contradiction (hard negative), unparseable
    assert keys[0] == truth_key >= 0 and keys[1] >= 0 and keys[1] != truth_key and keys[2] == -1
    # Another context whose continuation states anna's city carries the same key: a false negative.
    other_prompt = bios.probe_prompts(other, "birth_city")[bios.CONTEXT_TEMPLATES[1]]
    octx = [tok.eos_token_id, *encode(tok, [other_prompt])[0]]
    oids = [encode(tok, [other_prompt + f" {anna.birth_city}."])[0][len(octx) - 1 :]]
    _, okeys, *_ = judge_continuations(tok, octx, oids, bios_truth(people))
    assert okeys[0] == truth_key
    # A biography start: one false attribute anywhere makes it a contradiction.
    bctx = [tok.eos_token_id, *encode(tok, [anna.name])[0]]
    good = bios.render(bios.TEMPLATES["university"][0], anna.name, anna.university)[len(anna.name) :]
    bad = bios.render(bios.TEMPLATES["university"][0], anna.name, other.university)[len(anna.name) :]
    bids = [encode(tok, [anna.name + t])[0][len(bctx) - 1 :] for t in (good, bad)]
    assert judge_continuations(tok, bctx, bids, bios_truth(people))[0] == [
        1,
        -1 if other.university != anna.university else 1,
    ]


def test_positives_only_verified_where_the_truth_is_known():
    import torch

    from stablekd.launcher.config import ContrastiveConfig
    from stablekd.launcher.stages.contrastive import _positive, _unverifiable, counts

    # Context 0's truth is known: a true, a contradicting and an unverifiable continuation.
    # Context 1 has no known truth (a user corpus): every continuation is a positive.
    batch = {
        "verdict": torch.tensor([[1, -1, 0], [0, 0, 0]]),
        "known": torch.tensor([True, False]),
        "lm_input_ids": torch.zeros(2, 5, dtype=torch.long),
    }
    assert _positive(batch).tolist() == [[True, False, False], [True, True, True]]
    assert _unverifiable(batch).tolist() == [[False, False, True], [False, False, False]]
    # likelihood: one anchor per context with a positive; embedding: per continuation with a group-mate
    assert counts(ContrastiveConfig(scorer="likelihood"))(batch)["infonce"] == 2
    assert counts(ContrastiveConfig(scorer="embedding"))(batch)["infonce"] == 3


def _TokenLM(vocab: int) -> torch.nn.Module:
    """logits[t] depend on input_ids[t] only: enough to tell which tokens a score reads."""
    table = torch.nn.Embedding(vocab, vocab)
    model = LogitsLM(lambda input_ids, **_: table(input_ids), vocab, rows=5)
    model.table = table
    return model


def _groups(attributes: list[int], G: int = 2, C: int = 3, T: int = 6) -> dict:
    B = len(attributes)
    torch.manual_seed(0)
    return {
        "context_ids": torch.randint(1, 50, (B, C)),
        "context_len": torch.full((B,), C),
        "cand_ids": torch.randint(1, 50, (B, G, T)),
        "cand_len": torch.full((B, G), T),
        "verdict": torch.ones(B, G, dtype=torch.long),
        "known": torch.ones(B, dtype=torch.bool),
        "answer_key": torch.arange(B * G).view(B, G),
        "truth_key": torch.full((B,), -1),
        "attribute": torch.tensor(attributes),
    }


def test_negatives_ask_the_same_question_first():
    from stablekd.launcher.stages.contrastive import pick_negatives

    # 6 contexts x 2 continuations; contexts 0, 2, 4 ask attribute 1, contexts 1, 3 attribute 2, 5 is a
    # biography start (-1).
    attr = torch.tensor([1, 2, 1, 2, 1, -1])
    pool_group, pool_attr = torch.arange(6).repeat_interleave(2), attr.repeat_interleave(2)
    torch.manual_seed(0)
    neg = pick_negatives(pool_group, pool_attr, torch.arange(6), attr, 5, similar=True)
    assert neg.shape == (6, 5)
    for b in range(6):
        assert (pool_group[neg[b]] != b).all()  # never its own context
    # Context 0 has 4 same-question rows (contexts 2, 4): they come first; context 1 has 2 (context 3).
    assert set(pool_group[neg[0, :4]].tolist()) == {2, 4}
    assert set(pool_group[neg[1, :2]].tolist()) == {3}
    uniform = pick_negatives(pool_group, pool_attr, torch.arange(6), attr, 10, similar=False)
    assert uniform.shape == (6, 10)  # every other-context row, in random order


def test_score_tokens_score_only_the_start_of_each_continuation():
    from stablekd.launcher.config import ContrastiveConfig
    from stablekd.launcher.stages.contrastive import _likelihood_scores

    model = _TokenLM(50)
    batch = _groups([1, 2, 1, 2])
    changed = {**batch, "cand_ids": batch["cand_ids"].clone()}
    changed["cand_ids"][..., 2:] = 7  # every continuation token after the second
    out = {}
    for n in (2, 0):
        for name, b in (("same", batch), ("changed", changed)):
            torch.manual_seed(1)  # the same negatives
            out[n, name] = _likelihood_scores(model, b, ContrastiveConfig(negatives=2, score_tokens=n))[0]
    torch.testing.assert_close(out[2, "same"], out[2, "changed"])
    assert not torch.allclose(out[0, "same"], out[0, "changed"])
    torch.manual_seed(1)  # more than the stored continuation tokens: all of them, like 0
    wide = _likelihood_scores(model, batch, ContrastiveConfig(negatives=2, score_tokens=64))[0]
    torch.testing.assert_close(wide, out[0, "same"])


def test_hard_negatives_keep_what_the_model_scores_highest_in_the_loss():
    """contrastive.hard_negatives=1: each context's InfoNCE denominator keeps its positives and the one
    negative the model scores highest, so the term is smaller than with both negatives drawn, and as
    large as with 2 (both kept)."""
    from stablekd.launcher.config import load_config
    from stablekd.launcher.stages.contrastive import make_loss

    model = _TokenLM(50)
    batch = _groups([1, 2, 1, 2])
    lm = torch.randint(1, 50, (4, 6))
    infonce = {}
    for n in (0, 1, 2):
        cfg = load_config(
            None, ["contrastive.lm=ce", "contrastive.negatives=2", f"contrastive.hard_negatives={n}"]
        )
        torch.manual_seed(1)  # the same negatives
        out = make_loss(cfg)(model, {**batch, "lm_input_ids": lm, "lm_labels": lm})
        infonce[n] = float(out.sums["infonce"].detach())
    assert infonce[1] < infonce[0] and infonce[2] == pytest.approx(infonce[0])


def test_groups_of_a_user_corpus_are_labelled_by_reference_or_majority(tmp_path):
    """The stage's wiring of data_pipeline/answers.py: the record's reference flag picks the rule, the
    teacher's M samples vote, the gold row is left out of a vote, and the summary counts what happened."""
    from stablekd.data_pipeline.candidates import pack_groups
    from stablekd.launcher.config import load_config
    from stablekd.launcher.stages.contrastive import _positive, _unverifiable, label_summary, labeller
    from tests.hf_models import byte_level_tokenizer

    tok = byte_level_tokenizer(tmp_path / "tok")
    ctx = [tok.eos_token_id, *encode(tok, ["Q: Whom did Seth beget?\nA:"])[0]]

    def rows(*texts: str) -> list[list[int]]:
        return [encode(tok, [t])[0] + [tok.eos_token_id] for t in texts]

    groups = [  # M = 3 samples + the gold row
        rows(" Enos.", " Cainan.", " enos", " Enos."),  # reference: 2 right, 1 contradiction
        rows(" Cainan.", " Cainan.", " Enos.", " Jared."),  # no reference: majority Cainan, gold left out
        rows(" Cainan.", " Enos.", " Jared.", " Enos."),  # no reference, all different: unlabelled
    ]
    batch = {
        k: torch.as_tensor(v) for k, v in pack_groups([ctx] * 3, groups, 16, 8, [True, False, False]).items()
    }
    cfg = load_config(None, [f"run.out_dir={tmp_path / 'run'}", f"data.paths=[{tmp_path}]"])
    label = labeller(cfg, tok, voters=3, gold=True)
    summary = label_summary([batch], label)
    assert summary == {
        "groups": {"reference": 1, "majority": 1, "unlabelled": 1},
        "rows": {"positive": 3 + 2, "hard_negative": 1 + 1, "left_out": 1 + 4},
    }
    from stablekd.launcher.stages.contrastive import GroupsWithLM

    (b,) = list(GroupsWithLM([batch], [{"input_ids": torch.zeros(3, 4)}], label))
    assert _positive(b).tolist() == [[True, False, True, True], [True, True, False, False], [False] * 4]
    assert _unverifiable(b)[2].all() and not _unverifiable(b)[0].any()  # an unlabelled group has no anchor
    none = load_config(
        None, [f"run.out_dir={tmp_path / 'run'}", f"data.paths=[{tmp_path}]", "contrastive.labels=none"]
    )
    (n,) = list(GroupsWithLM([batch], [{"input_ids": torch.zeros(3, 4)}], labeller(none, tok, 3, True)))
    assert _positive(n).all()  # labels=none: every continuation of a context is its positive


def test_a_student_with_its_own_tokenizer_gets_the_groups_in_its_ids_with_the_teachers_labels(tmp_path):
    """Across tokenizers (data_pipeline/candidate_realign.py): each group is judged on the teacher's ids,
    then re-tokenised row for row, so every row keeps its verdict and its text."""
    import functools

    from stablekd.data_pipeline.align import Aligner, TokenBytes
    from stablekd.data_pipeline.answers import continuation_texts
    from stablekd.data_pipeline.candidate_realign import realign_groups
    from stablekd.data_pipeline.candidates import pack_groups
    from stablekd.launcher.config import load_config
    from stablekd.launcher.stages.contrastive import GroupsWithLM, labeller
    from tests.hf_models import byte_level_tokenizer

    tok, student = byte_level_tokenizer(tmp_path / "t", 512), byte_level_tokenizer(tmp_path / "s", 300)
    prompt = "Q: Whom did Seth beget?\nA:"
    ctx = [tok.eos_token_id, *encode(tok, [prompt])[0]]
    texts = [
        [" Enos.", " Cainan.", " Enos and Cainan.", " Enos."],
        [" Cainan.", " Cainan.", " Enos.", " Jared."],
    ]
    groups = [[encode(tok, [t])[0] + [tok.eos_token_id] for t in g] for g in texts]
    batch = {k: torch.as_tensor(v) for k, v in pack_groups([ctx] * 2, groups, 16, 8, [True, False]).items()}
    cfg = load_config(None, [f"run.out_dir={tmp_path / 'run'}", f"data.paths=[{tmp_path}]"])
    label = labeller(cfg, tok, voters=3, gold=True)
    lm = [{"input_ids": torch.zeros(2, 4)}]
    aligner = Aligner(TokenBytes.from_tokenizer(tok), student, 32)
    retokenize = functools.partial(realign_groups, aligner=aligner, ctx_len=16, cont_len=16)
    (plain,) = list(GroupsWithLM([batch], lm, label))
    (across,) = list(GroupsWithLM([batch], lm, label, retokenize))
    for key in ("verdict", "known", "answer_key", "truth_key", "attribute", "reference"):
        assert torch.equal(across[key], plain[key]), key
    assert plain["verdict"].tolist() == [[1, -1, -1, 1], [1, 1, -1, 0]]  # reference; majority, gold left out
    assert not torch.equal(across["cand_ids"][..., :8], plain["cand_ids"])  # other ids, the same text:
    for b in range(2):
        rows = [[x[b, g, : int(x_len[b, g])].tolist() for g in range(4)] for x, x_len in (
            (across["cand_ids"], across["cand_len"]), (plain["cand_ids"], plain["cand_len"])
        )]  # fmt: skip
        s_ctx = across["context_ids"][b, -int(across["context_len"][b]) :].tolist()
        assert continuation_texts(student, s_ctx, rows[0]) == continuation_texts(tok, ctx, rows[1])


def test_own_samples_join_each_group_before_the_gold_row_are_judged_and_resume_alike(tmp_path):
    """contrastive.own_samples (OwnSamples in GroupsWithLM): the model samples n continuations of every
    (left-padded) context, inserted between the teacher's rows and the gold row and judged by the same
    labeller without voting; a resumed source samples what the uninterrupted one did, and the training
    RNG is untouched."""
    from stablekd.data_pipeline.candidates import pack_groups
    from stablekd.launcher.config import ConfigError, load_config
    from stablekd.launcher.rank.distill_parts import sampler
    from stablekd.launcher.stages.contrastive import GroupsWithLM, OwnSamples, labeller
    from stablekd.model.build import build_model
    from tests.hf_models import byte_level_tokenizer
    from tests.test_on_policy import Records

    tok = byte_level_tokenizer(tmp_path / "tok")
    model = build_model("tiny-student", tok, 32, 0)
    eos, T, n = tok.eos_token_id, 5, 2
    ctx = [[eos, *encode(tok, [q])[0]] for q in ("Q: Whom did Seth beget?\nA:", "Q: Who?\nA:")]
    teacher_rows = [encode(tok, [t])[0] + [eos] for t in (" Enos.", " Cainan.", " Enos.")]  # m = 2 + gold
    packed = pack_groups(ctx, [teacher_rows] * 2, 16, T, [True, True])
    batch = {k: torch.as_tensor(v) for k, v in packed.items()}
    cfg = load_config(None, [f"run.out_dir={tmp_path / 'run'}", f"data.paths=[{tmp_path}]"])
    label = labeller(cfg, tok, voters=2, gold=True)

    def source(temperature: float) -> GroupsWithLM:
        own = OwnSamples(sampler(model, tok, T, temperature, synced=False), n, 7, 0, eos, gold=True)
        lm = Records([{"input_ids": torch.zeros(2, 4)}])
        return GroupsWithLM(Records([batch]), lm, label, own=own)

    rng = torch.get_rng_state()
    first = [b for _, b in zip(range(3), source(1.0), strict=False)]
    assert torch.equal(torch.get_rng_state(), rng)
    b = first[0]
    assert (
        b["cand_ids"].shape == (2, 3 + n, T) and b["own"].tolist() == [[False, False, True, True, False]] * 2
    )
    assert torch.equal(b["cand_ids"][:, :2], batch["cand_ids"][:, :2])  # the teacher's rows, then ...
    assert torch.equal(b["cand_ids"][:, -1], batch["cand_ids"][:, -1])  # ... the gold row stays last
    # The model's rows are judged against the reference like the teacher's (a random model: contradictions).
    for g in range(2):
        rows = [b["cand_ids"][g, j, : int(b["cand_len"][g, j])].tolist() for j in range(3 + n)]
        assert b["verdict"][g].tolist() == label(ctx[g], rows, True).verdicts
        assert b["verdict"][g, :2].tolist() == [1, -1] and all(v in (-1, 0) for v in b["verdict"][g, 2:4])
    assert any(not torch.equal(x["cand_ids"], first[0]["cand_ids"]) for x in first[1:])  # seeded per batch
    src = source(1.0)
    it = iter(src)
    next(it), next(it)
    resumed = source(1.0)
    resumed.load_state_dict(src.state_dict())
    assert torch.equal(next(iter(resumed))["cand_ids"], first[2]["cand_ids"])
    # Across tokenizers the groups are judged in the teacher's ids, the student samples in its own: refused.
    with pytest.raises(ConfigError, match="contrastive.own_samples with distill.cross_tokenizer"):
        load_config(None, ["contrastive.own_samples=2", "distill.cross_tokenizer=hybrid"])
    # Left padding is masked: near-greedy rows of the shorter context are those of it alone, unpadded.
    greedy = next(iter(source(1e-4)))
    alone = sampler(model, tok, T, 1e-4, synced=False)(torch.tensor([ctx[1]]), 0)[0, len(ctx[1]) :]
    for j in (2, 3):
        assert (
            greedy["cand_ids"][1, j, : len(alone)].tolist() == alone.tolist()[: int(greedy["cand_len"][1, j])]
        )
