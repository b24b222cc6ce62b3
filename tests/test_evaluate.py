"""The bios probe's counting (fake models whose answers the test knows), the HF generator, and the
evaluate stage run for real on a tiny run directory (report shape, report.md rows, TensorBoard scalars)."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stablekd.data_pipeline import bios
from stablekd.data_pipeline.bios import ATTRIBUTES, TEMPLATES
from stablekd.data_pipeline.tokenizer import load_tokenizer
from stablekd.evaluation import report
from stablekd.evaluation.bios_probe import HFGenerator, build_questions, probe
from stablekd.launcher import done, models, rundir
from stablekd.launcher.config import ConfigError, EvaluateConfig, load_config
from stablekd.launcher.driver import cli, pipeline, prepare
from stablekd.launcher.stages import evaluate as evaluate_stage
from stablekd.model.build import build_model, count_params
from tests.conftest import QUICKSTART, UPSTREAM, copy_run

REQUIRED = [
    "ppl",
    "ece",
    "bios_accuracy",
    "bios_self_consistency",
    "bios_cross_contradiction",
    "bios_intext_contradiction",
    "rep_2",
    "rep_3",
    "rep_4",
    "diversity",
    "coherence",
    "params",
    "gen_tokens_per_s",
]
UNSEEN = ["bios_unseen_accuracy", "bios_unseen_self_consistency", "bios_unseen_cross_contradiction"]


@pytest.fixture(scope="module")
def corpus() -> bios.BiosCorpus:
    return bios.generate(people=12, bios_per_person=1, heldout_bios_per_person=0, unseen_people=4, seed=5)


def _prompt_index(people: list[bios.Person]) -> dict[str, tuple[bios.Person, str]]:
    """Every probe prompt of every person -> (person, attribute); prompts are unique (names are)."""
    index = {}
    for p in people:
        for a in ATTRIBUTES:
            for prompt in bios.probe_prompts(p, a):
                assert prompt not in index
                index[prompt] = (p, a)
    return index


class TruthfulModel:
    """Always states the truth: " <value>." to a question, a true biography to a name."""

    def __init__(self, people: list[bios.Person]) -> None:
        self.index = _prompt_index(people)
        self.by_name = {p.name: p for p in people}

    def __call__(self, prompts, n, greedy, max_new_tokens):
        out = []
        for prompt in prompts:
            if prompt in self.by_name:
                p = self.by_name[prompt]
                text = " ".join(bios.render(TEMPLATES[a][0], p.name, p.value(a)) for a in ATTRIBUTES)
                out.append([text[len(p.name) :]] * n)
            else:
                person, attribute = self.index[prompt]
                out.append([f" {person.value(attribute)}."] * n)
        return out


class RandomModel:
    """Answers each question with the truth, one fixed wrong value, or words that parse to nothing,
    uniformly at random; writes bios that state birth_city twice, each a random pick of two cities.
    Logs everything it said, so the test can count the expected scores itself."""

    def __init__(self, people: list[bios.Person], seed: int) -> None:
        self.index = _prompt_index(people)
        self.by_name = {p.name: p for p in people}
        self.rng = random.Random(seed)
        self.said: dict[str, list[str]] = {}  # prompt -> answers in order (greedy first)
        self.bios: dict[str, tuple[str, str]] = {}  # name -> the two cities stated

    def _wrong(self, attribute: str, truth: str) -> str:
        if attribute == "birth_date":
            return "January 1, 1900" if truth != "January 1, 1900" else "January 2, 1900"
        return next(v for v in bios.KNOWN_VALUES[attribute] if v != truth)

    def __call__(self, prompts, n, greedy, max_new_tokens):
        out = []
        for prompt in prompts:
            if prompt in self.by_name:
                cities = (self.rng.choice(["Boston", "Denver"]), self.rng.choice(["Boston", "Denver"]))
                self.bios[prompt] = cities
                out.append([f" grew up in {cities[0]}. {prompt} hails from {cities[1]}."] * n)
                continue
            person, attribute = self.index[prompt]
            truth = person.value(attribute)
            row = []
            for _ in range(n):
                pick = self.rng.choice([truth, self._wrong(attribute, truth), None])
                self.said.setdefault(prompt, []).append(pick)
                row.append(f" {pick}." if pick else " something else entirely.")
            out.append(row)
        return out


SMALL = EvaluateConfig(samples=4, max_prompts=40, free_bios=6, seed=7)


def test_truthful_model_is_perfect(corpus):
    people, unseen = corpus.people, corpus.unseen
    result = probe(TruthfulModel(people + unseen), people, unseen, SMALL)
    m = result.metrics
    for group in ("bios", "bios_unseen"):
        assert m[f"{group}_accuracy"] == 1.0
        assert m[f"{group}_answered"] == 1.0
        assert m[f"{group}_self_consistency"] == 1.0
        assert m[f"{group}_cross_contradiction"] == 0.0
        assert m[f"{group}_intext_contradiction"] == 0.0


def test_random_model_scores_what_the_test_counts(corpus):
    people, unseen = corpus.people, corpus.unseen
    model = RandomModel(people + unseen, seed=11)
    m = probe(model, people, unseen, SMALL).metrics
    for group, persons in (("bios", people), ("bios_unseen", unseen)):
        names = {p.name for p in persons}
        asked = {q: a for q, a in model.said.items() if model.index[q][0].name in names}
        # max_prompts bounds the questions; each got 1 greedy + K sampled answers
        assert len(asked) == min(SMALL.max_prompts, 6 * len(persons))
        assert all(len(a) == 1 + SMALL.samples for a in asked.values())
        correct = agree = contradicting = 0.0
        for prompt, answers in asked.items():
            person, attribute = model.index[prompt]
            correct += answers[0] == person.value(attribute)
            stated = [a for a in answers if a is not None]
            agree += (Counter(stated).most_common(1)[0][1] if stated else 0) / len(answers)
            contradicting += len(set(stated)) >= 2
        assert m[f"{group}_accuracy"] == pytest.approx(correct / len(asked))
        assert m[f"{group}_self_consistency"] == pytest.approx(agree / len(asked))
        assert m[f"{group}_cross_contradiction"] == pytest.approx(contradicting / len(asked))
        written = {name: c for name, c in model.bios.items() if name in names}
        assert len(written) == min(SMALL.free_bios, len(persons))
        two_cities = sum(a != b for a, b in written.values())
        assert m[f"{group}_intext_contradiction"] == pytest.approx(two_cities / len(written))
    # and the draw is not degenerate: some right, some wrong, some contradicting
    assert 0 < m["bios_accuracy"] < 1 and 0 < m["bios_cross_contradiction"] < 1


def test_questions_are_seeded_and_bounded(corpus):
    a = build_questions(corpus.people, 10, seed=3)
    assert a == build_questions(corpus.people, 10, seed=3)
    assert len(a) == 10 and len({(q.person.name, q.attribute) for q in a}) == 10
    assert a != build_questions(corpus.people, 10, seed=4)
    for q in a:
        assert q.prompt in bios.probe_prompts(q.person, q.attribute)


# --- a real (tiny) model -------------------------------------------------------------------------

EVAL = [
    "evaluate.samples=2",
    "evaluate.max_prompts=4",
    "evaluate.free_bios=2",
    "evaluate.prefixes=8",  # × 32 tokens: the least a degeneration figure is shown for (MIN_CONTINUATION_TOKENS)
    "evaluate.prefix_tokens=8",
    "evaluate.max_new_tokens=32",
    "evaluate.ppl_batches=2",
]
TINY_RUN = [
    "data.bios.people=20",
    "data.bios.unseen_people=4",
    "data.bios.bios_per_person=2",
    "tokenizer.vocab_size=400",
    "data.seq_len=32",
    "launch.threads_per_rank=1",
]


def _tiny_run(root, extra=()):
    """A run directory with corpus, tokenizer and a `tiny` teacher exported to teacher/hf."""
    cfg = load_config(None, [f"run.out_dir={root / 'run'}", *TINY_RUN, *EVAL, *extra])
    prepare.prepare(cfg, ["evaluate"])  # config.yaml, corpus, tokenizer
    tok = load_tokenizer(models.tokenizer_dir(cfg))
    hf = cfg.run_dir / "teacher" / "hf"
    build_model("tiny", tok, cfg.data.seq_len, seed=0).save_pretrained(hf)
    tok.save_pretrained(hf)
    done.write_done(cfg, "teacher", {"hf": str(hf)}, {})  # evaluate reads only finished stages
    return cfg, tok


@pytest.fixture(scope="module")
def bios_run(tmp_path_factory):
    return _tiny_run(tmp_path_factory.mktemp("bios"))


def test_hf_generator_left_padding_and_seeding(bios_run):
    cfg, tok = bios_run
    model = build_model("tiny", tok, cfg.data.seq_len, seed=1).eval()
    gen = HFGenerator(model, tok, temperature=1.0, top_p=0.95)
    short, long = "Anna", "Anna Rosa Abbott was born in Boston. Anna Rosa Abbott studied"
    with torch.no_grad():
        alone = gen([short], 1, True, 6)[0]
        batched = gen([long, short], 1, True, 6)  # short is left-padded next to long
        assert batched[1] == alone and len(batched) == 2
        torch.manual_seed(0)
        first = gen([short, long], 3, False, 6)
        torch.manual_seed(0)
        assert gen([short, long], 3, False, 6) == first
        assert [len(r) for r in first] == [3, 3]
        ids = gen.generate_ids(gen.encode([short]), 2, False, 5, min_new_tokens=5)
        assert [len(s) for s in ids[0]] == [5, 5]  # forced length, no EOS: what tokens/s counts


def test_evaluate_stage_report(bios_run):
    cfg, _ = bios_run
    shutil.copytree(cfg.run_dir / "teacher" / "hf", cfg.run_dir / "student" / "hf")
    done.write_done(cfg, "distill", {"hf": str(cfg.run_dir / "student" / "hf")}, {})
    cli.main(["stage", "evaluate", str(cfg.run_dir / "config.yaml")])

    out = json.loads((cfg.run_dir / "eval" / "report.json").read_text())
    assert set(out["models"]) == {"teacher", "student"}
    teacher, student = out["models"]["teacher"], out["models"]["student"]
    device, dtype = evaluate_stage._device_dtype()
    bytes_per_param = torch.empty((), dtype=dtype).element_size()
    meter = report.MemoryMeter(device)
    meter.start()
    exact = device.type == "cuda" or meter.reset_peak  # else the lifetime-peak growth, which may read 0
    for values in (teacher, student):
        for key in REQUIRED + UNSEEN:
            assert key in values, key
        assert values["ppl"] > 1.0 and values["bios_ppl"] == values["ppl"]  # the same held-out file
        for key in [k for k in values if k.startswith("bios_") and k != "bios_ppl"] + ["diversity"]:
            assert 0.0 <= values[key] <= 1.0, key
        assert all(0.0 <= values[f"rep_{n}"] <= 100.0 for n in (2, 3, 4))
        assert -1.0 <= values["coherence"] <= 1.0
        assert values["gen_tokens_per_s"] > 0
        # peak memory (MiB): at least the weights the meter saw loaded (where the peak can be measured
        # from the start: CUDA, or a resettable peak RSS), and nowhere near the process's own footprint
        # (torch alone is hundreds of MiB): a tiny model's load + evaluate is a few MiB
        assert values["peak_mem_mib"] < 128, values
        if exact:
            assert values["peak_mem_mib"] >= values["params"] * bytes_per_param / 2**20, values
    # the same weights, prompts and seeds give the same numbers (speed and memory aside)
    tok = load_tokenizer(cfg.run_dir / "teacher" / "hf")
    assert teacher["params"] == count_params(build_model("tiny", tok, cfg.data.seq_len, seed=0))
    for key in teacher:
        if key not in ("gen_tokens_per_s", "peak_mem_mib"):
            assert student[key] == pytest.approx(teacher[key]), key
    assert out["ratios"]["student/teacher"]["params"] == 1.0
    # Every figure says what it was computed on; nothing was too small to show here.
    sizes = out["sizes"]
    assert sizes["rep_4"] == sizes["coherence"] == "8 held-out prefixes × 32 tokens" and out["missing"] == {}
    assert sizes["ppl"].endswith(" held-out tokens") and int(sizes["ppl"].split()[0]) >= report.MIN_PPL_TOKENS
    assert sizes["bios_accuracy"].endswith(" questions") and sizes["bios_cross_contradiction"].endswith(
        "answers"
    )

    md = (cfg.run_dir / "eval" / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and "(`" in line]
    assert len(rows) == len(teacher)  # one table row per metric
    for key in teacher:
        assert any(f"(`{key}`)" in row for row in rows), key
    assert "## Samples: teacher" in md and "## Samples: student" in md

    # TensorBoard: one run per model (tb/evaluate/<model>), the same tags in each: one chart per metric.
    for name in ("teacher", "student"):
        acc = EventAccumulator(str(cfg.run_dir / "tb" / "evaluate" / name))
        acc.Reload()
        tags = acc.Tags()["scalars"]
        for key in REQUIRED:
            group = "efficiency" if key in ("params", "gen_tokens_per_s") else "stability"
            assert f"{group}/{key}" in tags, key
        (ppl,) = acc.Scalars("stability/ppl")
        assert ppl.step == 0 and ppl.value == pytest.approx(out["models"][name]["ppl"], rel=1e-5)
    record = json.loads((cfg.run_dir / "eval" / "DONE.json").read_text())
    assert record["produced"]["models"] == ["teacher", "student"]


def test_user_corpus_has_no_bios_keys(tmp_path):
    # biographies again, but as plain user text: without the built-in corpus's truth there is no probe
    text = bios.generate(people=20, bios_per_person=2, heldout_bios_per_person=1, unseen_people=0)
    (tmp_path / "train.txt").write_text("\n".join(text.train) + "\n")
    (tmp_path / "held.txt").write_text("\n".join(text.heldout) + "\n")
    extra = [f"data.paths=[{tmp_path / 'train.txt'}]", f"data.eval_paths=[{tmp_path / 'held.txt'}]"]
    extra.append("data.text_unit=line")  # one biography per line
    cfg, _ = _tiny_run(tmp_path, extra)
    pipeline.run(cfg, ["evaluate"])
    out = json.loads((cfg.run_dir / "eval" / "report.json").read_text())
    values = out["models"]["teacher"]
    assert not [k for k in values if k.startswith("bios")]
    assert {"ppl", "rep_2", "diversity", "coherence", "params", "gen_tokens_per_s"} <= set(values)
    assert "bios_* keys absent" in (cfg.run_dir / "eval" / "report.md").read_text()


def test_too_little_held_out_text_shows_figures_missing_with_the_reason(tmp_path):
    """Three held-out prefixes × 32 tokens: degeneration and coherence would rest on 96 generated tokens;
    the report shows them missing and says why, and never falls back to continuing training text."""
    text = bios.generate(people=20, bios_per_person=2, heldout_bios_per_person=1, unseen_people=0)
    (tmp_path / "train.txt").write_text("\n".join(text.train) + "\n")
    (tmp_path / "held.txt").write_text("\n".join(text.heldout[:3]) + "\n")
    extra = [f"data.paths=[{tmp_path / 'train.txt'}]", f"data.eval_paths=[{tmp_path / 'held.txt'}]"]
    cfg, _ = _tiny_run(tmp_path, [*extra, "data.text_unit=line"])
    pipeline.run(cfg, ["evaluate"])
    out = json.loads((cfg.run_dir / "eval" / "report.json").read_text())
    values, missing = out["models"]["teacher"], out["missing"]
    assert set(missing) == {"rep_2", "rep_3", "rep_4", "diversity", "distinct_2", "coherence"}
    assert not set(missing) & set(values)
    assert (
        missing["rep_4"].startswith("96 generated tokens < 256")
        and missing["coherence"] == "3 held-out prefixes < 8"
    )
    md = (cfg.run_dir / "eval" / "report.md").read_text()
    assert f"missing: {missing['rep_4']}" in md and "training text" not in md


def test_missing_models_are_named(tmp_path):
    with pytest.raises(ConfigError, match="teacher/hf.*student/hf"):
        models.find_models(tmp_path)
    (tmp_path / "teacher" / "ckpt").mkdir(parents=True)
    with pytest.raises(ConfigError, match="teacher/hf missing.*no complete.json.*teacher.export_hf=true"):
        models.find_models(tmp_path)
    (tmp_path / "teacher" / "ckpt" / "complete.json").write_text("{}")
    assert models.find_models(tmp_path) == {"teacher": tmp_path / "teacher" / "ckpt"}  # from its shards
    (tmp_path / "student" / "ckpt").mkdir(parents=True)
    with pytest.raises(ConfigError, match="student/hf missing.*student.export_hf=true"):
        models.find_models(tmp_path)


def test_report_ratios_and_markdown():
    models = {
        "teacher": {"params": 4e6, "gen_tokens_per_s": 100.0, "ppl": 3.0},
        "student": {"params": 1e6, "gen_tokens_per_s": 250.0, "ppl": 4.0},
    }
    r = report.ratios(models)
    assert r == {"student/teacher": {"params": 0.25, "gen_tokens_per_s": 2.5, "ppl": pytest.approx(4 / 3)}}
    md = report.markdown({"models": models, "ratios": r, "notes": ["a note"]}, {})
    assert "| student/teacher | 0.250 | 2.500 | – | – | – | 1.333 |" in md and "- a note" in md
    assert report.ratios({"student": models["student"]}) == {}


# --- a teacher in ZeRO-3 shards only (2 DeepSpeed launches: the teacher stage, the evaluate stage) ---


@pytest.mark.distributed
def test_evaluate_sharded_teacher(upstream, tmp_path):
    """No teacher/hf, a complete 2-rank ZeRO-3 checkpoint (the session's tiny upstream run): evaluate runs
    on 2 ranks, the teacher stays partitioned, and its perplexity equals DeepSpeed's zero_to_fp32
    consolidation run in this process."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from stablekd.launcher.stages import evaluate

    run = copy_run(upstream, tmp_path / "run")
    overrides = [f"run.out_dir={run}", *UPSTREAM, *EVAL]
    cfg = load_config(QUICKSTART, overrides)
    assert not (cfg.run_dir / "teacher" / "hf").exists()
    assert evaluate.needs_ranks(cfg)
    cli.main(["stage", "evaluate", str(QUICKSTART), *overrides])

    out = json.loads((cfg.run_dir / "eval" / "report.json").read_text())
    teacher = out["models"]["teacher"]
    for key in REQUIRED + UNSEEN:
        assert key in teacher, key
    assert any("ZeRO-3 shards" in n for n in out["notes"])
    record = json.loads((cfg.run_dir / "eval" / "DONE.json").read_text())
    assert record["produced"]["models"] == ["teacher"]

    ckpt = cfg.run_dir / "teacher" / "ckpt"
    tag = json.loads((ckpt / "complete.json").read_text())["tag"]
    tok = load_tokenizer(models.tokenizer_dir(cfg))
    model = build_model("tiny", tok, cfg.data.seq_len, seed=12345)  # all weights come from the load
    model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag))
    model.eval()
    assert teacher["params"] == count_params(model)
    with torch.no_grad():
        whole = evaluate._perplexity(model, rundir.eval_files(cfg), models.tokenizer_dir(cfg), cfg, tok)
    print(f"sharded ppl {teacher['ppl']!r}, consolidated ppl {whole.ppl!r}")
    assert teacher["ppl"] == pytest.approx(whole.ppl, rel=1e-4)
    assert teacher["bpb"] == pytest.approx(whole.bits_per_byte, rel=1e-4)
