"""The user's own models: Hugging Face directories of several architectures with a byte-level BPE
`tokenizer.json` and padded vocabularies (tests/hf_models.py builds them; nothing is downloaded).

In one process, no DeepSpeed job: every architecture builds, counts its FLOPs from its own parameters,
trains one KD + CE step on soft labels with its padded rows cut off, and never generates a padded id;
padded KD equals unpadded KD on the same logits; the tokenizer rules of launcher/models.py. The run of
all five stages on 2 ranks with such models is tests/test_user_corpus.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from stablekd.data_pipeline.tokenizer import load_tokenizer, tokenizer_hash
from stablekd.evaluation.bios_probe import HFGenerator
from stablekd.launcher import models
from stablekd.launcher.config import ConfigError, load_config
from stablekd.launcher.driver import prepare
from stablekd.model.build import build_model, count_params, flops_per_token, generation_config
from stablekd.model.head import install_head
from stablekd.objectives.kd import SampledLabels, kd_sum
from stablekd.objectives.kd_losses import soft_label_loss
from stablekd.objectives.lm import nll_sum
from tests.conftest import QUICKSTART
from tests.fixed_model import fixed
from tests.hf_models import PROSE, byte_level_tokenizer, model_dir

ARCHS = ("llama", "qwen2", "gpt2", "mistral", "phi")
TOKENS = 384  # the tokenizer's size; every model below has more rows


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    byte_level_tokenizer(out, TOKENS)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_any_architecture_trains_on_soft_labels_with_its_padded_rows_cut(arch, tok_dir, tmp_path):
    tok = load_tokenizer(tok_dir)
    rows = TOKENS + 64 + 8 * ARCHS.index(arch)  # each its own padded size
    src = model_dir(tmp_path / arch, arch, tok, rows)
    model = build_model(str(src), tok, 64, seed=0)
    assert model.config.vocab_size == rows and model.get_output_embeddings().vocab == TOKENS

    # FLOPs from the model's own matrices: 6 × (all 2-D weights but embedding tables, + a tied head) + attention.
    c = model.config
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2 and id(p) not in tables)
    tied = id(model.get_output_embeddings().weight) in tables
    assert tied == (arch == "gpt2")
    expected = 6 * (matrices + tied * rows * c.hidden_size) + 12 * c.num_hidden_layers * c.hidden_size * 64
    assert flops_per_token(model, 64) == expected and matrices < count_params(model)

    ids = torch.tensor(tok([PROSE.read_text()[:2000]])["input_ids"])[:, :48].repeat(2, 1)  # (2, 48)
    gen = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": ids,
        "sample_ids": torch.randint(0, TOKENS, (2, 48, 4), generator=gen),
        "sample_weights": torch.full((2, 48, 4), 0.25),
    }
    loss = soft_label_loss(alpha=0.5)(model, batch)
    total = loss.sums["kd"] + loss.sums["ce"]
    total.backward()
    head = model.get_output_embeddings().weight.grad
    assert torch.isfinite(total) and head[:TOKENS].abs().sum() > 0
    if not tied:  # a tied table's padded rows get no gradient through the (cut) head either way
        assert head[TOKENS:].abs().sum() == 0  # padded rows never count

    # Generation never picks a padded row, even when the model prefers them: their logits raised far
    # above every real id's (a hook on the head, so every architecture, tied or biased, gets the same).
    model.eval()
    lift = torch.zeros(rows)
    lift[TOKENS:] = 1e3
    hook = model.get_output_embeddings().register_forward_hook(
        lambda _m, _i, out: out + lift[: out.shape[-1]]
    )
    prompt = ids[0, :8].tolist()
    # Control: a head over every row (no cut) lets the padded rows win, greedy and sampled, at every step.
    install_head(model, rows)
    for greedy in (True, False):
        settings = dict(do_sample=not greedy, num_return_sequences=1, max_new_tokens=6, min_new_tokens=6)
        with torch.no_grad():
            new = model.generate(
                input_ids=torch.tensor([prompt]), generation_config=generation_config(tok, **settings)
            )
        assert len(new[0, 8:]) == 6 and all(t >= TOKENS for t in new[0, 8:].tolist()), new
    install_head(model, TOKENS)
    for greedy, n in ((True, 1), (False, 4)):
        out = HFGenerator(model, tok, temperature=1.0, top_p=1.0).generate_ids([prompt], n, greedy, 6, 6)
        assert all(len(sample) == 6 and all(0 <= t < TOKENS for t in sample) for sample in out[0]), out
    hook.remove()


def test_padded_kd_equals_unpadded_on_the_same_logits():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 7, 20, generator=gen, dtype=torch.float64)
    padded = torch.cat([logits, 5 + torch.randn(2, 7, 12, generator=gen, dtype=torch.float64)], -1)
    ids = torch.randint(0, 20, (2, 7))
    topk = torch.randint(0, 20, (2, 7, 3), generator=gen)
    lp = torch.log_softmax(torch.randn(2, 7, 20, generator=gen), -1).gather(-1, topk)
    for labels in ({"topk_ids": topk, "topk_logprobs": lp}, {"sample_ids": topk, "sample_weights": lp.exp()}):
        batch = {"input_ids": ids, **labels}
        for kind in ("fkl", "rkl", "gjsd") if "topk_ids" in labels else ("fkl",):
            loss = soft_label_loss(kind, 2.0, alpha=0.3)
            cut, full = loss(fixed(padded, vocab=20, rows=3), batch).sums, loss(fixed(logits), batch).sums
            for term in ("kd", "ce"):
                assert torch.allclose(cut[term], full[term], rtol=1e-12), (kind, term)
            # Without the cut the padded rows take mass: the check can fail.
            assert not torch.allclose(soft_label_loss(kind, 2.0)(fixed(padded), batch).sums["kd"], full["kd"])


def test_chunked_cross_entropy_and_sampled_kd_match_the_unchunked_ones():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 9, 50, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (3, 9))
    labels[1, :4] = -100
    ref = torch.nn.functional.cross_entropy(
        x[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )
    got, n = nll_sum(x, labels)
    assert int(n) == 3 * 8 - 3 and torch.allclose(got, ref)
    assert torch.allclose(*(torch.autograd.grad(v, x)[0] for v in (got, ref)))
    sampled = SampledLabels(
        torch.randint(0, 50, (3, 9, 5), generator=gen), torch.rand(3, 9, 5, generator=gen)
    )
    one = kd_sum(x, sampled, labels, temperature=1.5)[0]  # chunks of V-sized rows: one chunk
    many = kd_sum(x, sampled, labels, temperature=1.5, chunk_tokens=2)[0]
    lq = torch.log_softmax(x / 1.5, -1).gather(-1, sampled.ids)
    live = (torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100) != -100)[..., None]
    ref = -(sampled.weights * lq * live).sum() * 1.5**2
    assert torch.allclose(one, ref) and torch.allclose(many, ref)
    assert torch.allclose(*(torch.autograd.grad(v, x)[0] for v in (many, ref)))
    # A −inf logit at a position no loss counts (the last of each row) leaves the sums finite.
    y = x.detach().clone()
    y[:, -1, :] = float("-inf")
    assert torch.isfinite(kd_sum(y, sampled, labels)[0]) and torch.isfinite(nll_sum(y, labels)[0])


def test_a_teacher_directory_brings_its_tokenizer_and_a_student_must_share_it(tok_dir, tmp_path):
    tok = load_tokenizer(tok_dir)
    teacher = model_dir(tmp_path / "teacher", "qwen2", tok, TOKENS + 64)
    student = model_dir(tmp_path / "student", "gpt2", tok, TOKENS + 8)
    run = [f"run.out_dir={tmp_path / 'run'}", f"teacher.model={teacher}", f"data.paths=[{PROSE}]"]
    cfg = load_config(QUICKSTART, [*run, f"student.model={student}"])
    assert models.tokenizer_dir(cfg) == teacher and not models.trains_tokenizer(cfg)
    # The same tokenizer written another way (as another process or library version would: other key
    # order, other indentation): other bytes, same content, same hash. Both save_pretrained calls above
    # wrote identical bytes, so without the rewrite a byte hash would pass too.
    path = student / "tokenizer.json"
    parsed = json.loads(path.read_text())
    path.write_text(json.dumps(dict(reversed(parsed.items())), indent=4, ensure_ascii=True))
    assert path.read_bytes() != (teacher / "tokenizer.json").read_bytes()
    assert len(load_tokenizer(student)) == TOKENS  # still a tokenizer the libraries read
    assert tokenizer_hash(student) == tokenizer_hash(teacher)
    prepare.check_files(cfg)

    other = tmp_path / "other"
    byte_level_tokenizer(other, TOKENS + 16)  # another vocabulary: another tokenizer
    shutil.copy(other / "tokenizer.json", student / "tokenizer.json")
    cfg = load_config(QUICKSTART, [*run, f"student.model={student}"])
    with pytest.raises(ConfigError) as e:
        prepare.check_files(cfg)
    msg = str(e.value)
    for part in (
        str(student),
        str(teacher),
        f"{TOKENS + 16} tokens",
        f"{TOKENS} tokens",
        "distill.cross_tokenizer=hybrid",
    ):
        assert part in msg, part
    assert tokenizer_hash(student)[:12] in msg and tokenizer_hash(teacher)[:12] in msg

    # A teacher directory without a tokenizer, or with another one than tokenizer.path names, is refused.
    bare = tmp_path / "bare"
    shutil.copytree(teacher, bare)
    (bare / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=f"teacher.model {bare}: no tokenizer.json or tokenizer.model"):
        prepare.check_files(load_config(QUICKSTART, [*run, f"teacher.model={bare}"]))
    prepare.check_files(load_config(QUICKSTART, [*run, f"teacher.model={bare}", f"tokenizer.path={teacher}"]))
    with pytest.raises(
        ConfigError, match=f"tokenizer.path: {other} .* is not the tokenizer of teacher.model"
    ):
        prepare.check_files(load_config(QUICKSTART, [*run, f"tokenizer.path={other}"]))

    # A preset teacher trains SentencePiece: a student bringing a tokenizer cannot share it.
    cfg = load_config(QUICKSTART, [f"run.out_dir={tmp_path / 'run2'}", f"student.model={student}"])
    with pytest.raises(ConfigError, match="brings its own tokenizer but this run trains a SentencePiece"):
        prepare.check_files(cfg)
    # ... unless it is the tokenizer this run trained (a student the run exported, fine-tuned further).
    (tmp_path / "run3" / "tokenizer").mkdir(parents=True)
    shutil.copy(student / "tokenizer.json", tmp_path / "run3" / "tokenizer" / "tokenizer.json")
    prepare.check_files(
        load_config(QUICKSTART, [f"run.out_dir={tmp_path / 'run3'}", f"student.model={student}"])
    )

    # Across tokenizers (distill.cross_tokenizer): both accepted, the student keeps its own tokenizer (every
    # stage: the contrastive one re-tokenises its candidate groups, data_pipeline/candidate_realign.py).
    for overrides in (
        [*run, f"student.model={student}"],
        [f"run.out_dir={tmp_path / 'run2'}", f"student.model={student}"],
    ):
        cfg = load_config(QUICKSTART, [*overrides, "distill.cross_tokenizer=hybrid"])
        prepare.check_files(cfg)
        assert models.student_tokenizer_dir(cfg) == student
