"""On-policy micro-batches (data_pipeline/on_policy.py): which micro-batches, what the student samples and
the teacher scores, the seeds that make a resume sample the same, and the loss on them
(objectives/kd_losses.py `with_on_policy`) against kd_sum on the same tensors. In one process, on tiny
real models; the 2-rank ZeRO-3 run is in test_distill_stage.py."""

from __future__ import annotations

import pytest
import torch

from stablekd.data_pipeline.on_policy import OnPolicy, TaskPrompts, generated_labels, is_on_policy
from stablekd.data_pipeline.tokenizer import load_tokenizer
from stablekd.launcher.config import ConfigError, load_config
from stablekd.launcher.rank import distill_parts
from stablekd.model.build import build_model
from stablekd.model.head import HeadRows, last_hidden
from stablekd.objectives.kd import kd_sum
from stablekd.objectives.kd_losses import ON_POLICY, on_policy_counts, soft_label_loss, with_on_policy
from stablekd.objectives.lm import IGNORE_INDEX
from tests.conftest import QUICKSTART
from tests.hf_models import byte_level_tokenizer

P, N, B, L = 4, 6, 3, 16


def test_schedule_takes_every_round_share_of_micro_batches():
    assert [i for i in range(8) if is_on_policy(i, 0.5)] == [1, 3, 5, 7]
    assert [i for i in range(8) if is_on_policy(i, 0.25)] == [3, 7]
    assert all(is_on_policy(i, 1.0) for i in range(8)) and not any(is_on_policy(i, 0.0) for i in range(8))
    # Ramped over 20 micro-batches: λ·20/2 = 5 of the first 20 (few early on), then every second one.
    ramped = [i for i in range(40) if is_on_policy(i, 0.5, ramp=20)]
    assert len([i for i in ramped if i < 20]) == 5 and len([i for i in ramped if i < 10]) == 1
    assert ramped[5:] == list(range(21, 40, 2))


def test_labels_count_the_generated_tokens_up_to_the_first_eos():
    ids = torch.tensor([[5, 6, 7, 2, 8, 2], [5, 6, 9, 9, 9, 9]])
    labels = generated_labels(ids, 2, eos_id=2)
    x = IGNORE_INDEX
    assert labels.tolist() == [[x, x, 7, 2, x, x], [x, x, 9, 9, 9, 9]]


class Records:
    """A resumable soft-label source: fixed batches, position = batches drawn."""

    def __init__(self, batches):
        self.batches, self.pos = batches, 0

    def __iter__(self):
        while True:
            self.pos += 1  # counted when delivered, as the shard and stream readers count
            yield self.batches[(self.pos - 1) % len(self.batches)]

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


class PlainTeacher:
    def __init__(self, model):
        self.model = model

    def logits(self, ids):  # the whole logits: what the tests compare against
        return self.model(input_ids=ids).logits

    def hidden(self, ids):
        return last_hidden(self.model, ids)

    def head_rows(self):
        return HeadRows(self.model.get_output_embeddings())


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tok_dir = tmp_path_factory.mktemp("tok")
    byte_level_tokenizer(tok_dir, 300)
    tok = load_tokenizer(tok_dir)
    student = build_model("tiny-student", tok, L, 0)
    teacher = PlainTeacher(build_model("tiny", tok, L, 1).eval())
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(1, len(tok), (B, L), generator=g)} for _ in range(4)]

    def make(share=0.5, rank=0):
        sample = distill_parts.sampler(student, tok, N, 1.0, synced=False)
        return OnPolicy(Records(batches), sample, teacher, share, P, 7, rank, tok.eos_token_id)

    return tok, student, teacher, batches, make


def test_student_samples_teacher_scores_and_a_resume_samples_the_same(parts):
    tok, student, teacher, batches, make = parts
    rng = torch.get_rng_state()
    first = [b for _, b in zip(range(4), make(), strict=False)]
    assert torch.equal(torch.get_rng_state(), rng)  # the training RNG (dropout) is not consumed
    assert first[0] is batches[0] and first[2] is batches[2]  # λ = 0.5: micro-batches 1 and 3 are sampled
    on = first[1]
    assert on["input_ids"].shape == (B, P + N) and torch.equal(
        on["input_ids"][:, :P], batches[1]["input_ids"][:, :P]
    )
    assert "teacher_logits" not in on and on["teacher_hidden"].shape[:2] == (B, P + N)  # the whole sequence
    with on["teacher_head"] as head:  # its head on the hidden rows: the whole forward's logits
        rows = head(on["teacher_hidden"])
    assert torch.allclose(rows, teacher.logits(on["input_ids"]), rtol=1e-5, atol=1e-6)
    assert (on["labels"][:, :P] == IGNORE_INDEX).all() and (on["labels"][:, P] != IGNORE_INDEX).all()
    again = [b for _, b in zip(range(4), make(), strict=False)]
    assert torch.equal(again[3]["input_ids"], first[3]["input_ids"])  # seeds of (seed, micro-batch, rank)
    other = [b for _, b in zip(range(2), make(rank=1), strict=False)]
    assert not torch.equal(other[1]["input_ids"], first[1]["input_ids"])
    # Resume after two micro-batches: the third and fourth are the uninterrupted run's.
    src = make()
    it = iter(src)
    next(it), next(it)
    resumed = make()
    resumed.load_state_dict(src.state_dict())
    it2 = iter(resumed)
    assert next(it2) is batches[2] and torch.equal(next(it2)["input_ids"], first[3]["input_ids"])


def test_sampling_uses_a_generator_of_its_own_and_reseeds_nothing(parts, monkeypatch):
    """The sample is a function of its seed alone: the global RNG's state neither changes it nor is changed
    by it, and no global seeding function runs (torch.manual_seed would reseed every CUDA generator of the
    training RNG, which fork_rng(devices=[]) does not restore; on this CPU machine that call is the trace)."""
    tok, student, teacher, batches, make = parts
    sample = make().sample
    prompts = batches[0]["input_ids"][:, :P]
    seeding = []
    for name in ("manual_seed", "seed"):
        monkeypatch.setattr(torch, name, lambda *a, _n=name: seeding.append(_n))
    for name in ("manual_seed", "manual_seed_all", "seed", "seed_all"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, _n=name: seeding.append(f"cuda.{_n}"))
    torch.random.default_generator.manual_seed(1)
    state = torch.get_rng_state()
    a = sample(prompts, 11)
    assert torch.equal(torch.get_rng_state(), state) and seeding == []
    torch.random.default_generator.manual_seed(2)  # another global state: the same sample
    assert torch.equal(sample(prompts, 11), a) and not torch.equal(sample(prompts, 12), a)
    first = [b for _, b in zip(range(2), make(), strict=False)][1]
    assert seeding == [] and torch.equal(
        first["input_ids"], sample(batches[1]["input_ids"][:, :P], make().seed_of(1))
    )


def test_task_prompts_batch_one_length_and_a_resume_draws_the_same(parts):
    """distill.on_policy_prompts=tasks: each on-policy micro-batch continues B task prompts of one length
    (no padding), drawn by (seed, micro-batch, rank), every length in proportion to its prompts."""
    tok, student, teacher, batches, _ = parts
    prompts = [[3, 10, 11], [3, 12, 13], [3, 14], [3, 15, 16, 17], [3, 18]]
    bank = TaskPrompts(prompts)
    draws = [bank.draw(B, seed) for seed in range(300)]
    assert all(d.shape[0] == B and d.tolist()[0] in prompts for d in draws)
    assert all(row in prompts for d in draws for row in d.tolist())
    assert torch.equal(bank.draw(B, 5), draws[5]) and any(not torch.equal(d, draws[5]) for d in draws)
    share = {n: sum(d.shape[1] == n for d in draws) / len(draws) for n in (2, 3, 4)}
    assert share == pytest.approx({2: 0.4, 3: 0.4, 4: 0.2}, abs=0.08)

    def make(rank=0):
        sample = distill_parts.sampler(student, tok, N, 1.0, synced=False)
        return OnPolicy(Records(batches), sample, teacher, 0.5, P, 7, rank, tok.eos_token_id, prompts=bank)

    first = [b for _, b in zip(range(4), make(), strict=False)]
    for index in (1, 3):
        on, drawn = first[index], bank.draw(B, make().seed_of(index))
        assert torch.equal(on["input_ids"][:, : drawn.shape[1]], drawn)
        assert (
            on["input_ids"].shape == (B, drawn.shape[1] + N)
            and on["teacher_hidden"].shape[1] == drawn.shape[1] + N
        )
        assert (on["labels"][:, : drawn.shape[1]] == IGNORE_INDEX).all()
    src = make()
    it = iter(src)
    next(it), next(it), next(it)
    resumed = make()
    resumed.load_state_dict(src.state_dict())
    assert torch.equal(next(iter(resumed))["input_ids"], first[3]["input_ids"])


def test_task_prompts_of_a_corpus_and_a_corpus_without_tasks(tmp_path, parts):
    tok = parts[0]
    tasks, prose = tmp_path / "tasks.jsonl", tmp_path / "prose.txt"
    tasks.write_text(
        '{"text": "A plain record among the tasks."}\n'
        '{"prompt": "Who built the ark in the old story of the flood?", "response": " Noah."}\n'
        '{"prompt": "Who?", "response": " Ruth."}\n'
    )
    prose.write_text("Prose only, no question here.\n")
    args = ["data.seq_len=16", "distill.on_policy=0.5", "distill.on_policy_prompts=tasks",
            f"distill.on_policy_prompt_tokens={P}", f"distill.on_policy_new_tokens={N}"]  # fmt: skip
    cfg = load_config(QUICKSTART, [*args, f"data.paths=[{tasks}]", f"run.out_dir={tmp_path / 'run'}"])
    bank = distill_parts.task_prompts(cfg, tok)
    asked = [list(ids) for same in bank.by_length.values() for ids in same]
    eos = tok.eos_token_id
    assert bank.count == 2 and all(ids[0] == eos and len(ids) <= P for ids in asked)
    ark = tok("Who built the ark in the old story of the flood?", add_special_tokens=False).input_ids
    assert [eos, *ark[-(P - 1) :]] in asked  # a long question: its last P − 1 ids, after the EOS
    cfg = load_config(QUICKSTART, [*args, f"data.paths=[{prose}]", f"run.out_dir={tmp_path / 'run2'}"])
    with pytest.raises(ConfigError, match=f"no task record .* in data.paths {prose}"):
        distill_parts.task_prompts(cfg, tok)
    with pytest.raises(ConfigError, match="tasks draws the prompts of data.paths' task records"):
        load_config(QUICKSTART, args)  # the bios corpus


def test_gumbel_sampling_draws_from_the_tempered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, float("-inf")])
    draws = 40_000
    for temperature in (1.0, 2.0):
        pick = distill_parts.GumbelSampling(3, temperature)(None, logits.expand(draws, -1)).argmax(-1)
        freq = torch.bincount(pick, minlength=5) / draws
        expected = torch.softmax(logits / temperature, -1)
        assert freq[4] == 0 and torch.allclose(freq, expected, atol=0.01), (temperature, freq, expected)
    # top_p 0.8: the nucleus is the two likeliest ids (0.64 + 0.24 of the mass), renormalised
    pick = distill_parts.GumbelSampling(3, 1.0, top_p=0.8)(None, logits.expand(draws, -1)).argmax(-1)
    freq = torch.bincount(pick, minlength=5) / draws
    nucleus = torch.softmax(logits[:2], -1)
    assert freq[2:].sum() == 0 and torch.allclose(freq[:2], nucleus, atol=0.01), freq


def test_loss_is_kd_sum_on_the_generated_tokens_and_offline_batches_pass_through(parts):
    tok, student, teacher, batches, make = parts
    on = next(b for i, b in zip(range(2), make(), strict=False) if i == 1)
    offline = soft_label_loss()
    loss = with_on_policy(offline, "gjsd", 2.0, beta=0.3)
    out = loss(student, on)
    ids = on["input_ids"]
    ref, n = kd_sum(student(input_ids=ids).logits, teacher.logits(ids), on["labels"], "gjsd", 2.0, 0.3)
    assert set(out.sums) == {ON_POLICY} and out.sums[ON_POLICY].item() == pytest.approx(ref.item(), rel=1e-6)
    assert out.metrics["generated_tokens"] == (float(n), 1.0)
    assert on_policy_counts(lambda b: {"kd": 1})(on) == {ON_POLICY: int(n)}
    assert on_policy_counts(lambda b: {"kd": 1})({"input_ids": 0}) == {"kd": 1}


def test_share_zero_builds_todays_stage(parts):
    tok, student, _, batches, _ = parts
    for share, terms in ((0.0, {"kd"}), (0.5, {"kd", ON_POLICY})):
        cfg = load_config(QUICKSTART, ["data.seq_len=16", "distill.on_policy_prompt_tokens=4",
                                       "distill.on_policy_new_tokens=4", f"distill.on_policy={share}"])  # fmt: skip
        stage = distill_parts.build_stage(cfg, student, tok, Records(batches), [])
        assert set(stage.weights) == terms


def test_config_refuses_what_cannot_run():
    base = ["data.seq_len=16", "distill.on_policy=0.5", "distill.on_policy_prompt_tokens=4"]
    with pytest.raises(
        ConfigError, match="on_policy_prompt_tokens \\+ on_policy_new_tokens = 36: expected at most"
    ):
        load_config(QUICKSTART, base)
    base.append("distill.on_policy_new_tokens=4")
    with pytest.raises(ConfigError, match="on_policy_kind: expected one of"):
        load_config(QUICKSTART, [*base, "distill.on_policy_kind=bogus"])
    with pytest.raises(ConfigError, match="on_policy with cross_tokenizer"):
        load_config(QUICKSTART, [*base, "distill.cross_tokenizer=hybrid"])
    sampled = [*base, "soft_labels.encoding=sampled"]
    with pytest.raises(ConfigError, match="sampled soft labels support kind fkl only"):
        load_config(QUICKSTART, [*sampled, "distill.kind=rkl"])
    assert load_config(QUICKSTART, [*sampled, "distill.on_policy_kind=rkl"]).distill.on_policy_kind == "rkl"
