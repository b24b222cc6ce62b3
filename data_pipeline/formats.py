"""Names the configuration may use for on-disk formats, importable without torch (the launching process
checks a config before any rank starts)."""

from __future__ import annotations

# soft_labels.encoding: what a soft-label record stores per token (data_pipeline/encodings.py implements them)
ENCODINGS = ("topk", "topp", "sampled")
