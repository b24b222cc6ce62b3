"""Llama-style model sizes by name. `tiny` is for tests; `*-s` fit the quickstart on 2 CPU cores; larger ones are for GPUs.

Parameters at vocab 2,000 (embeddings untied, counted): tiny 0.15M, student-s 1.1M, teacher-s 4.2M,
student-m 88M, teacher-m 287M, teacher-l 1.12B; a larger vocabulary adds 2 × vocab × hidden.
"""

from __future__ import annotations

PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    ),
    "student-s": dict(
        hidden_size=128,
        intermediate_size=320,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
    "teacher-s": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
    ),
    "student-m": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
    ),
    "teacher-m": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=8,
    ),
    "teacher-l": dict(
        hidden_size=2048,
        intermediate_size=5504,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=8,
    ),
}


def preset(name: str) -> dict[str, int]:
    """The architecture fields of a preset; a KeyError names the known presets."""
    if name not in PRESETS:
        raise KeyError(
            f"unknown model preset {name!r} (known: {', '.join(PRESETS)}; or a local Hugging Face directory)"
        )
    return dict(PRESETS[name])
