"""The report as a picture: eval/report.png, the key stability metrics per model side by side as bars.

One panel per metric (only those the report has), one bar per model in the report's column order, the
value printed on each bar and whether lower or higher is better under the title. Drawn with Pillow (which
TensorBoard needs anyway), so the picture costs no plotting library; the same pixels go to TensorBoard's
IMAGES tab (report.write_tensorboard).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# (metric, lower is better): the panels, in this order, where the report has the metric.
PANELS: tuple[tuple[str, bool], ...] = (
    ("task_exact_match", False),
    ("task_agreement", False),
    ("task_contradiction", True),
    ("task_paraphrase_contradiction", True),
    ("bios_accuracy", False),
    ("bios_self_consistency", False),
    ("bios_cross_contradiction", True),
    ("bios_intext_contradiction", True),
    ("ppl", True),
    ("bpb", True),
    ("rep_4", True),
    ("diversity", False),
    ("coherence", False),
    ("gen_tokens_per_s", False),
)
COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3")  # per model, the report's column order
PANEL_W, PANEL_H, COLUMNS, LEGEND_H = 300, 210, 4, 40


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size)  # Pillow's bundled scalable font (needs FreeType)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _fmt(v: float) -> str:
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1000 else f"{v:,.0f}"


def draw(models: dict[str, dict[str, float]], labels: dict[str, str]) -> Image.Image | None:
    """The chart of `models` ({model: {metric: value}}), panel titles from `labels` (metric -> label);
    None when the report has none of the panels' metrics."""
    panels = [(k, low) for k, low in PANELS if any(k in m for m in models.values())]
    if not panels:
        return None
    names = list(models)
    rows = -(-len(panels) // COLUMNS)
    img = Image.new("RGB", (PANEL_W * min(COLUMNS, len(panels)), LEGEND_H + PANEL_H * rows), "white")
    d = ImageDraw.Draw(img)
    title, small = _font(14), _font(12)
    x = 10
    for i, name in enumerate(names):  # legend
        d.rectangle([x, 12, x + 16, 28], fill=COLORS[i % len(COLORS)])
        d.text((x + 22, 12), name, fill="black", font=title)
        x += 40 + int(d.textlength(name, font=title))
    for p, (key, low) in enumerate(panels):
        left, top = PANEL_W * (p % COLUMNS), LEGEND_H + PANEL_H * (p // COLUMNS)
        d.text((left + 10, top + 4), labels.get(key, key)[:40], fill="black", font=title)
        d.text(
            (left + 10, top + 22), "lower is better" if low else "higher is better", fill="#666", font=small
        )
        values = [models[n].get(key) for n in names]
        top_value = max((v for v in values if v is not None), default=0.0) or 1.0
        base, height = top + PANEL_H - 28, PANEL_H - 90  # bars grow up from `base`
        width = (PANEL_W - 40) // len(names)
        d.line([left + 15, base, left + PANEL_W - 15, base], fill="#999")
        for i, (name, v) in enumerate(zip(names, values, strict=True)):
            x0 = left + 20 + i * width
            if v is None:
                d.text((x0 + 4, base - 16), "n/a", fill="#999", font=small)
                continue
            h = max(1, round(height * max(v, 0.0) / top_value))
            d.rectangle([x0 + 4, base - h, x0 + width - 4, base], fill=COLORS[i % len(COLORS)])
            d.text((x0 + 4, base - h - 16), _fmt(v), fill="black", font=small)
            d.text((x0 + 4, base + 4), name[:12], fill="#333", font=small)
    return img


def as_array(img: Image.Image) -> np.ndarray:
    """[H, W, 3] uint8: what SummaryWriter.add_image takes with dataformats="HWC"."""
    return np.asarray(img.convert("RGB"))
