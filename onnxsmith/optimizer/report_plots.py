"""The charts of ``report.html``: each function draws one matplotlib figure and returns it as PNG bytes.

Figures are made with :class:`matplotlib.figure.Figure` on the Agg canvas directly, never through ``pyplot``:
no GUI backend is touched, the process-wide backend is left alone, and no figure is registered anywhere, so
each one is freed (after an explicit ``clear``) when the function returns.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

MAX_BARS = 40
"""At most this many bars in a per-layer chart; the rest are counted in a note."""
DPI = 80
WEIGHT_COLOR = "#4c72b0"
ACTIVATION_COLOR = "#dd8452"
REFERENCE_COLOR = "#8c8c8c"
CANDIDATE_COLOR = "#55a868"


@dataclass(frozen=True)
class UniformRange:
    """A plain quantization grid's representable range ``[low, high]``."""

    low: float
    high: float


@dataclass(frozen=True)
class TwinRange:
    """A twin-uniform quantizer: R1 ``[r1_low, split)`` of step ``delta_r1``, R2 ``[split, r2_high]`` of
    ``delta_r2``."""

    r1_low: float
    split: float
    r2_high: float
    delta_r1: float
    delta_r2: float


def layer_sqnr_chart(rows: Sequence[tuple[str, str, float]], max_bars: int = MAX_BARS) -> bytes:
    """Horizontal bars of ``(tensor, "weight" | "activation", SQNR dB)``, in the given order (worst first) from
    the top, at most ``max_bars``."""
    shown = list(rows)[:max_bars]
    fig = Figure(figsize=(8, 0.8 + 0.22 * max(len(shown), 1)), dpi=DPI)
    ax = fig.add_subplot()
    labels = [_short(name) for name, _, _ in shown]
    values = [value for _, _, value in shown]
    colors = [WEIGHT_COLOR if kind == "weight" else ACTIVATION_COLOR for _, kind, _ in shown]
    positions = range(len(shown))
    ax.barh(positions, values, color=colors)
    ax.set_yticks(list(positions), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("SQNR (dB)")
    ax.legend(handles=[_patch(WEIGHT_COLOR, "weight"), _patch(ACTIVATION_COLOR, "activation")], fontsize=7,
              loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    _margins(fig, left=0.36)
    return _png(fig)


def activation_histogram_chart(tensor: str, edges: Sequence[float], counts: Sequence[int],
                               quant_range: UniformRange | TwinRange | None) -> bytes:
    """The histogram of one activation (log counts) with its quantization range: two vertical lines for a
    uniform grid, two shaded regions R1 / R2 and a dashed split line for a twin-uniform quantizer."""
    fig = Figure(figsize=(4.6, 2.6), dpi=DPI)
    ax = fig.add_subplot()
    ax.stairs(counts, edges, fill=True, color=REFERENCE_COLOR)
    ax.set_yscale("log")
    if isinstance(quant_range, UniformRange):
        for x in (quant_range.low, quant_range.high):
            ax.axvline(x, color="#c44e52", linewidth=1.2)
        ax.set_title(f"{_short(tensor, 48)}\nrange [{quant_range.low:.3g}, {quant_range.high:.3g}]", fontsize=8)
    elif isinstance(quant_range, TwinRange):
        ax.axvspan(quant_range.r1_low, quant_range.split, color=WEIGHT_COLOR, alpha=0.25,
                   label=f"R1 (step {quant_range.delta_r1:.3g})")
        ax.axvspan(quant_range.split, quant_range.r2_high, color=ACTIVATION_COLOR, alpha=0.25,
                   label=f"R2 (step {quant_range.delta_r2:.3g})")
        ax.axvline(quant_range.split, color="black", linestyle="--", linewidth=1)
        ax.legend(fontsize=6, loc="upper right")
        ax.set_title(f"{_short(tensor, 48)}\ntwin-uniform, split {quant_range.split:.3g}", fontsize=8)
    else:
        ax.set_title(f"{_short(tensor, 48)}\n(range not recorded)", fontsize=8)
    ax.tick_params(labelsize=7)
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.12, top=0.8)
    return _png(fig)


def sparsity_chart(rows: Sequence[tuple[str, float, str | None]], max_bars: int = MAX_BARS) -> bytes:
    """Horizontal bars of each weight's zero fraction ``(layer, fraction, N:M pattern or None)``, the pattern
    written beside its bar."""
    shown = list(rows)[:max_bars]
    fig = Figure(figsize=(8, 0.8 + 0.22 * max(len(shown), 1)), dpi=DPI)
    ax = fig.add_subplot()
    positions = list(range(len(shown)))
    fractions = [fraction for _, fraction, _ in shown]
    colors = [WEIGHT_COLOR if pattern else REFERENCE_COLOR for _, _, pattern in shown]
    ax.barh(positions, fractions, color=colors)
    for y, (_, fraction, pattern) in zip(positions, shown, strict=True):
        ax.text(min(fraction, 1.0) + 0.01, y, pattern or "no N:M", va="center", fontsize=6)
    ax.set_yticks(positions, [_short(name) for name, _, _ in shown], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.15)
    ax.set_xlabel("zero fraction")
    ax.grid(axis="x", alpha=0.3)
    _margins(fig, left=0.36)
    return _png(fig)


def size_latency_chart(size_bytes: Mapping[str, float], latency_ms: Mapping[str, float]) -> bytes:
    """Two small bar panels, file size (MB) and latency (ms), FP32 reference beside the optimized model."""
    fig = Figure(figsize=(6, 2.6), dpi=DPI)
    for index, (title, values, scale) in enumerate((("size (MB)", size_bytes, 1e-6),
                                                    ("latency (ms)", latency_ms, 1.0))):
        ax = fig.add_subplot(1, 2, index + 1)
        names = [k for k in ("reference", "candidate") if k in values]
        heights = [float(values[k]) * scale for k in names]
        bars = ax.bar([{"reference": "FP32", "candidate": "optimized"}[k] for k in names], heights,
                      color=[{"reference": REFERENCE_COLOR, "candidate": CANDIDATE_COLOR}[k] for k in names])
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.margins(y=0.15)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.88, wspace=0.3)
    return _png(fig)


def _margins(fig: Figure, left: float) -> None:
    """Fixed margins (``tight_layout`` costs more than drawing): room for tensor names on the left, and about
    half an inch for the axis label below whatever the figure's height."""
    height = fig.get_figheight()
    fig.subplots_adjust(left=left, right=0.97, bottom=min(0.6 / height, 0.4), top=1 - min(0.15 / height, 0.1))


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    fig.clear()
    return buffer.getvalue()


def _patch(color: str, label: str) -> Patch:
    return Patch(color=color, label=label)


def _short(name: str, limit: int = 40) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1):]
