"""Tiny Hugging Face model directories of real architectures, built locally (nothing is downloaded).

What a user brings: a `tokenizer.json` (byte-level BPE, as GPT-2, Llama 3, Qwen2 ship) beside the
model's `config.json` and weights, its embedding padded past the tokenizer's size as released
checkpoints pad (Qwen2.5-7B: 152,064 rows for 151,665 tokens).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PhiConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

REPO = Path(__file__).resolve().parent.parent
PROSE = REPO / "tests" / "data" / "kjv_genesis_exodus.txt"
EOS = "<|endoftext|>"


def byte_level_tokenizer(out: Path, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the KJV prose, saved as `tokenizer.json` in `out`; no pad
    token (GPT-2's convention), EOS `<|endoftext|>`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(PROSE)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def _config(arch: str, rows: int, eos: int, positions: int):
    small = dict(vocab_size=rows, bos_token_id=eos, eos_token_id=eos)
    if arch == "gpt2":  # tied input/output embedding, learned positions, Conv1D layers
        return GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=positions, **small)
    shapes = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=positions,
        **small,
    )
    if arch == "phi":  # partial rotary, LayerNorm, a biased LM head
        return PhiConfig(**shapes)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
    return cls(num_key_value_heads=2, tie_word_embeddings=False, **shapes)


def model_dir(
    out: Path, arch: str, tokenizer: PreTrainedTokenizerFast, rows: int, positions: int = 128, seed: int = 0
) -> Path:
    """A randomly initialised `arch` model with `rows` embedding rows (>= len(tokenizer): padded) saved
    with its tokenizer in `out`, as `save_pretrained` writes a released checkpoint."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch, rows, tokenizer.eos_token_id, positions))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
