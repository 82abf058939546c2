"""Attention heatmaps drawn with matplotlib."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from tfjax.translator import Attention

FORMATS = (".png", ".svg", ".pdf")  # what `attention_heatmap` writes, by the path's suffix
# Fonts with CJK glyphs, tried after DejaVu Sans (matplotlib's own, which has none); only
# those installed are named, as a missing family costs a findfont warning per piece.
_CJK_FONTS = (
    "Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans SC", "Source Han Sans SC",
    "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "Droid Sans Fallback", "Microsoft YaHei",
    "SimHei", "PingFang SC", "Hiragino Sans GB", "Arial Unicode MS",
)  # fmt: skip


def check_path(path: str | Path) -> Path:
    """`path` if an image can be written there: an existing folder and a suffix in FORMATS."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"{path}: the image must end in one of {', '.join(FORMATS)}")
    if not path.parent.is_dir():
        raise ValueError(f"{path}: folder {path.parent} does not exist")
    return path


def attention_heatmap(
    attention: Attention,
    path: str | Path,
    *,
    layer: int = -1,
    heads: Literal["mean", "all"] = "mean",
) -> Path:
    """Draw one decoder layer's cross-attention: source pieces across, target pieces down.

    Args:
      attention: a `tfjax.translator.Attention`; its `cross` is [layers, heads, T, S].
      path: the image to write; its suffix (one of FORMATS) picks the format.
      layer: which decoder layer, indexed as a Python list (-1: the last).
      heads: "mean" draws the mean over the layer's heads; "all" one panel per head.
    Returns:
      The path written.
    """
    from matplotlib import font_manager, rc_context
    from matplotlib.figure import Figure

    path = check_path(path)
    layers = attention.cross.shape[0]
    if not -layers <= layer < layers:
        raise ValueError(f"layer {layer}: the decoder's layers are 0 to {layers - 1}")
    if heads not in ("mean", "all"):
        raise ValueError(f"heads={heads!r}: expected 'mean' or 'all'")
    weights = attention.cross[layer]  # [heads, T, S]
    panels = [weights.mean(axis=0)] if heads == "mean" else list(weights)
    titles = ["mean over heads"] if heads == "mean" else [f"head {h}" for h in range(len(panels))]
    installed = {font.name for font in font_manager.fontManager.ttflist}
    families = ["DejaVu Sans", *(f for f in _CJK_FONTS if f in installed)]
    # text.parse_math off: a piece such as "$5" is text, not mathtext.
    with rc_context({"font.family": families, "text.parse_math": False}):
        # A bare Figure, not pyplot: no global figure or backend state; PNG renders with Agg.
        figure = _draw(Figure(layout="constrained"), panels, titles, attention, layer % layers)
        with warnings.catch_warnings():
            # Pieces with glyphs no installed font has are drawn as boxes; one warning per
            # glyph would bury the output.
            warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from")
            figure.savefig(path, bbox_inches="tight", dpi=150)
    return path


def _draw(
    figure: Figure, panels: list[np.ndarray], titles: list[str], attention: Attention, layer: int
) -> Figure:
    """Lay out panels [T, S] in a grid of at most 4 columns, labelled with the pieces."""
    source, target = attention.source_pieces, attention.target_pieces
    columns = min(len(panels), 4)
    rows = math.ceil(len(panels) / columns)
    # About a third of an inch per piece, so rotated labels do not overlap.
    width, height = max(3.0, 0.3 * len(source) + 1.5), max(2.5, 0.3 * len(target) + 1.0)
    figure.set_size_inches(width * columns, height * rows)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, panel, title in zip(axes, panels, titles, strict=False):
        image = ax.imshow(panel, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(source)), source, rotation=90, fontsize=8)
        ax.set_yticks(range(len(target)), target, fontsize=8)
        ax.set_title(title, fontsize=9)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    layers = attention.cross.shape[0]
    figure.suptitle(f"cross-attention, decoder layer {layer} (of {layers}, from 0)", fontsize=10)
    figure.supxlabel("source pieces", fontsize=9)
    figure.supylabel("target pieces", fontsize=9)
    figure.colorbar(image, ax=list(axes[: len(panels)]), shrink=0.8)
    return figure
