"""Build or load the causal LMs every stage trains.

Under ZeRO-3 the caller keeps a `transformers.integrations.HfDeepSpeedConfig` alive before calling
these: `from_config`/`from_pretrained` then construct inside `deepspeed.zero.Init`, so parameters are
partitioned as they are created and no rank ever holds the whole model.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import deepspeed
import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from stablekd.model.head import install_head
from stablekd.model.presets import preset


def model_config(name: str, tokenizer: PreTrainedTokenizerBase, max_positions: int) -> LlamaConfig:
    """Llama config for a preset with the tokenizer's vocabulary and special ids."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **preset(name),
    )


def build_model(
    name_or_dir: str, tokenizer: PreTrainedTokenizerBase, max_positions: int, seed: int
) -> PreTrainedModel:
    """A fresh model from a preset name, or the weights of a local Hugging Face directory; its head cut to
    the tokenizer's ids and computing losses chunk by chunk (model/head.py)."""
    if Path(name_or_dir).is_dir():
        return load_model(Path(name_or_dir), tokenizer, torch.float32)
    model = AutoModelForCausalLM.from_config(
        model_config(name_or_dir, tokenizer, max_positions), dtype=torch.float32
    )
    init_weights(model, seed)
    return install_head(model, len(tokenizer))


def load_model(path: Path, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype) -> PreTrainedModel:
    """A Hugging Face directory's causal LM with the head of model/head.py over the tokenizer's ids."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    if rows(model.config) < len(tokenizer):
        raise ValueError(f"{path}: {rows(model.config)} embedding rows < tokenizer size {len(tokenizer)}")
    return install_head(model, len(tokenizer))


def init_weights(model: PreTrainedModel, seed: int) -> None:
    """Draw every matrix from N(0, initializer_range) with a generator seeded by (seed, parameter name).

    zero.Init construction consumes the global RNG differently from a plain one, so transformers' own init
    gives other weights under ZeRO-3 than in one process. Seeding per name makes the initial model the
    same for any ZeRO stage and world size, which is what lets a 2-rank run be checked against a plain loop.
    Vectors (norm weights) keep their constant init; the padding row of the embedding stays zero.
    """
    std = model.config.initializer_range
    pad = model.config.pad_token_id
    for name, p in model.named_parameters():
        if len(_shape(p)) < 2:  # a partitioned parameter's own shape is (0,)
            continue
        partitioned = hasattr(p, "ds_id")
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=partitioned):
            if not partitioned or torch.distributed.get_rank() == 0:
                gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                w = torch.randn(p.shape, generator=gen) * std
                if name.endswith("embed_tokens.weight") and pad is not None:
                    w[pad] = 0
                with torch.no_grad():
                    p.copy_(w.to(p.dtype))


def rows(config: PretrainedConfig) -> int:
    """Embedding rows of a model config (its text config's vocab_size: a multimodal checkpoint such as
    Gemma 3 keeps the language model's fields there)."""
    return config.get_text_config().vocab_size


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that fills left-padding of generation prompts: the tokenizer's pad token, else its EOS (GPT-2,
    Llama 3 and many byte-level tokenizers have no pad token; masked positions never count)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def generation_config(tokenizer: PreTrainedTokenizerBase, **settings: Any) -> GenerationConfig:
    """The whole decoding set-up of a generate call: the run's `settings`, the tokenizer's pad and EOS, and
    nothing from the model directory's generation_config.json (a release's repetition_penalty or top_k
    would decode that model unlike the others in the report). No padded row is ever generated: the head
    (model/head.py) gives logits over the tokenizer's ids only."""
    return GenerationConfig(pad_token_id=pad_id(tokenizer), eos_token_id=tokenizer.eos_token_id, **settings)


def count_params(model: torch.nn.Module) -> int:
    """Parameter count; under ZeRO-3 a partitioned parameter reports its full size in `ds_numel`."""
    return sum(_numel(p) for p in model.parameters())


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token of any causal LM: 6·N for the matmuls + 12·L·H·T for attention (PaLM appendix B).

    N counts the weight matrices a token's activations are multiplied by: every parameter of two or more
    dimensions except the embedding tables (a lookup: token and learned position embeddings), plus the
    output embedding once when it is tied to the input one (GPT-2: the LM head is that table). L and H are
    the (text) config's own num_hidden_layers and hidden_size (transformers maps GPT-2's n_layer / n_embd
    onto them). A mixture of experts counts every expert, so its MFU reads high by experts / active ones.
    """
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    n = sum(_numel(p) for p in model.parameters() if len(_shape(p)) >= 2 and id(p) not in tables)
    head = model.get_output_embeddings()
    if head is not None and id(head.weight) in tables:
        n += _numel(head.weight)
    c = model.config.get_text_config()
    return 6 * n + 12 * c.num_hidden_layers * c.hidden_size * seq_len


def _numel(p: torch.Tensor) -> int:
    return getattr(p, "ds_numel", p.numel())  # a ZeRO-3 partition's own numel is 0


def _shape(p: torch.Tensor) -> torch.Size:
    return getattr(p, "ds_shape", p.shape)


def export_hf(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out: Path, zero3: bool) -> None:
    """save_pretrained + tokenizer on rank 0 (call on every rank); under ZeRO-3 the full parameters are
    gathered first. Plain `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(out)` load the result."""
    params = list(model.parameters()) if zero3 else []
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero3):
        if torch.distributed.get_rank() == 0:
            model.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
    torch.distributed.barrier()
