"""Llama-style model sizes by name. `tiny` and `tiny-student` are for tests; `*-s` fit the quickstart on 2 CPU cores; larger ones are for GPUs.

Parameters at vocab 2,000 (embeddings untied, counted): tiny 0.15M, tiny-student 0.05M, student-s 1.1M, teacher-s 4.2M,
student-m 88M, teacher-m 287M, teacher-l 1.12B; a larger vocabulary adds 2 × vocab × hidden. `teacher-10m` and
`student-3m` are the real-text pair (configs/kjv.yaml): 10.0M and 2.55M (0.25×) parameters at vocab 4,096.
"""

from __future__ import annotations

# fmt: off
_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
PRESETS: dict[str, tuple[int, int, int, int, int]] = {
    #              hidden  mlp   layers heads kv_heads
    "tiny":      (32,    64,    2,    2,    2),
    "tiny-student": (12, 32,    1,    2,    2),
    "student-s": (128,   320,   3,    4,    4),
    "teacher-s": (256,   688,   4,    8,    8),
    "student-3m": (160,  432,   4,    4,    4),
    "teacher-10m": (320, 864,   6,    5,    5),
    "student-m": (768,   2048,  12,   12,   12),
    "teacher-m": (1024,  2816,  24,   16,   8),
    "teacher-l": (2048,  5504,  24,   16,   8),
}
# fmt: on


def preset(name: str) -> dict[str, int]:
    """The architecture fields of a preset; a KeyError names the known presets."""
    if name not in PRESETS:
        raise KeyError(
            f"unknown model preset {name!r} (known: {', '.join(PRESETS)}; or a local Hugging Face directory)"
        )
    return dict(zip(_FIELDS, PRESETS[name], strict=True))


def param_count(name: str, vocab: int) -> int:
    """Parameters of a preset at vocabulary `vocab`, by arithmetic (what model/build.py builds: Llama,
    untied embedding and head, no biases): no model and no transformers import needed."""
    h, m, layers, heads, kv = (preset(name)[f] for f in _FIELDS)
    attention = 2 * h * h + 2 * h * (kv * (h // heads))  # q and o; k and v over kv heads
    block = attention + 3 * h * m + 2 * h  # + gate/up/down, two RMSNorms
    return 2 * vocab * h + layers * block + h  # embedding, head, final RMSNorm
