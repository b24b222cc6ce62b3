"""Model presets, the seeded per-name init, loading a local Hugging Face directory, FLOPs per token."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from stablekd.data_pipeline.tokenizer import load_tokenizer, train_tokenizer
from stablekd.launcher import models
from stablekd.launcher.config import load_config
from stablekd.model.build import build_model, count_params, flops_per_token, model_config
from stablekd.model.presets import PRESETS, param_count
from tests.conftest import QUICKSTART


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [f"person {i} was born in city {i % 7} and works at company {i % 5}." for i in range(300)]
    return load_tokenizer(train_tokenizer(texts, 320, tmp_path_factory.mktemp("tok")))


def test_init_is_a_function_of_seed_and_name(tok):
    a, b, c = (build_model("tiny", tok, 32, seed) for seed in (0, 0, 1))
    for (name, pa), (_, pb), (_, pc) in zip(
        a.named_parameters(), b.named_parameters(), c.named_parameters(), strict=True
    ):
        assert torch.equal(pa, pb), name
        if pa.dim() == 2:
            assert not torch.equal(pa, pc), name
            assert 0.015 < float(pa.detach().std()) < 0.025  # N(0, initializer_range = 0.02)
    assert torch.count_nonzero(a.model.embed_tokens.weight[tok.pad_token_id]) == 0


def test_local_directory(tok, tmp_path):
    model = build_model("tiny", tok, 32, 3)
    model.save_pretrained(tmp_path / "hf")
    loaded = build_model(str(tmp_path / "hf"), tok, 32, 0)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), loaded.parameters(), strict=True))
    cfg = load_config(QUICKSTART, [f"teacher.model={tmp_path / 'hf'}"])
    assert models.teacher_source(cfg) == str(tmp_path / "hf")  # a Hugging Face directory as given
    assert models.teacher_source(load_config(QUICKSTART, ["teacher.model=student-s"])) == "student-s"
    # a previous run directory: tests/test_tasks.py (its ZeRO checkpoint, tokenizer and shapes)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_count_arithmetic_is_the_built_models(name, tok):
    """The launching process's disk estimate counts a preset's parameters without building it."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(name, tok, 64))
    assert param_count(name, len(tok)) == count_params(model)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_flops_per_token_is_6n_plus_attention(name, tok):
    with torch.device("meta"):  # shapes only
        model = AutoModelForCausalLM.from_config(model_config(name, tok, 64))
    c = model.config
    matmul_params = (
        count_params(model)
        - c.vocab_size * c.hidden_size
        - sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    )
    assert flops_per_token(model, 64) == 6 * matmul_params + 12 * c.num_hidden_layers * c.hidden_size * 64
