"""Figures of activation statistics and selections (matplotlib, Agg; PNG and SVG).

Every function returns a :class:`matplotlib.figure.Figure` built with the
object-oriented API on an Agg canvas (no pyplot, no global backend switch, no
display needed) and, given ``path``, writes it: ``path`` with a suffix writes
that one file; without a suffix it writes ``path.png`` and ``path.svg``
(or the ``formats`` asked for).

- :func:`plot_activation_ratio`: R per layer per language (paper Fig. 2);
- :func:`plot_overlap`: overlap with English per layer per language plus the average (Fig. 3);
- :func:`plot_selection`: a criterion's score per layer, the threshold and the selected layers;
- :func:`plot_overlap_comparison`: the overlap of two statistics, e.g. before/after training (Fig. 6);
- :func:`plot_representations`: last-token hidden states of parallel texts in 2-D,
  coloured by language, base vs trained side by side (Fig. 10);
- :func:`plot_all`: the statistics figures into one directory.

Example:
    >>> from layerselect.plots import plot_all
    >>> plot_all(stats, "figs/", selection=sel)                 # doctest: +SKIP
    [PosixPath('figs/activation_ratio.png'), ...]
    >>> plot_overlap(stats, path="figs/overlap.png")            # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InvalidInputError
from .stats import ActivationStats

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .selection import Selection

__all__ = [
    "plot_activation_ratio",
    "plot_overlap",
    "plot_selection",
    "plot_overlap_comparison",
    "plot_all",
    "plot_representations",
    "plot_state_projections",
    "save_figure",
    "LANG_COLORS",
]

#: Distinct colours for up to 20 languages (tab20's dark shades first, then the light ones).
LANG_COLORS: tuple[str, ...] = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#000000", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",
    "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5",
)

FORMATS = ("png", "svg")
PathLike = str | os.PathLike[str]


def _figure(width: float = 7.0, height: float = 4.2) -> tuple[Figure, Axes]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise InvalidInputError("plots need matplotlib: pip install 'layerselect[plots]'") from exc
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def save_figure(fig: Figure, path: PathLike, formats: Sequence[str] = FORMATS, dpi: int = 110) -> list[Path]:
    """Write ``fig``: to ``path`` if it has a suffix, else to ``path.<fmt>`` for each of ``formats``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    targets = [path] if path.suffix else [path.with_name(f"{path.name}.{fmt}") for fmt in formats]
    for target in targets:
        fmt = target.suffix.lstrip(".").lower()
        if fmt not in ("png", "svg", "pdf"):
            raise InvalidInputError(f"cannot write {target}: use a .png, .svg or .pdf file name")
        fig.savefig(target, format=fmt, dpi=dpi)
    return targets


def _finish(fig: Figure, path: PathLike | None, formats: Sequence[str]) -> Figure:
    if path is not None:
        save_figure(fig, path, formats)
    return fig


def _rows(stats: ActivationStats) -> tuple[list[int], list[int]]:
    order = sorted(range(len(stats.layers)), key=lambda i: stats.layers[i])
    return order, [stats.layers[i] for i in order]


def _title(stats: ActivationStats, what: str) -> str:
    name = stats.model_name
    return f"{what}" + (f" — {Path(str(name)).name}" if name else "")


def plot_activation_ratio(
    stats: ActivationStats,
    path: PathLike | None = None,
    *,
    variant: str = "mean",
    formats: Sequence[str] = FORMATS,
) -> Figure:
    """Activation ratio ``R[l, g]`` per layer, one line per language (paper Fig. 2)."""
    r = stats.activation_ratio(variant)
    order, layers = _rows(stats)
    fig, ax = _figure()
    for g, name in enumerate(stats.groups):
        ax.plot(layers, r[order, g].tolist(), marker="o", ms=3, lw=1.2, label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("activation ratio R" + ("" if variant == "mean" else f" ({variant})"))
    ax.set_title(_title(stats, "Activation ratio per layer"))
    ax.grid(alpha=0.3)
    ax.legend(ncol=min(5, len(stats.groups)), fontsize=8)
    return _finish(fig, path, formats)


def plot_overlap(
    stats: ActivationStats,
    path: PathLike | None = None,
    *,
    reference: str = "en",
    tau: float = 0.5,
    method: str = "ratio",
    formats: Sequence[str] = FORMATS,
) -> Figure:
    """Overlap with ``reference`` per layer per language, plus the average (paper Fig. 3)."""
    if len(stats.groups) < 2:
        raise InvalidInputError(f"the overlap plot needs two languages or more; the stats have {stats.groups}")
    ov = stats.overlap(reference, tau, method)
    order, layers = _rows(stats)
    fig, ax = _figure()
    for g, name in enumerate(stats.groups):
        if name == reference:
            continue
        ax.plot(layers, ov.per_group[order, g].tolist(), lw=1.0, alpha=0.75, label=name)
    ax.plot(layers, ov.average[order].tolist(), color="black", lw=2.4, marker="o", ms=4, label="AVG")
    peak = layers[int(ov.average[order].argmax())]
    ax.axvline(peak, color="black", ls=":", lw=1)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"overlap with {reference} ({method}, tau={tau})")
    ax.set_title(_title(stats, f"Overlap of active neurons with {reference!r} (peak: layer {peak})"))
    ax.grid(alpha=0.3)
    ax.legend(ncol=min(5, len(stats.groups)), fontsize=8)
    return _finish(fig, path, formats)


def plot_selection(
    selection: Selection,
    path: PathLike | None = None,
    *,
    formats: Sequence[str] = FORMATS,
) -> Figure:
    """The criterion's score per layer as bars, the threshold as a line, selected layers highlighted.

    For ``msd`` the layers of ``K`` are shaded and the overlap peak marked.
    """
    if not selection.scores:
        raise InvalidInputError(f"the {selection.criterion!r} selection has no per-layer scores to plot")
    layers = sorted(selection.scores)
    values = [selection.scores[layer] for layer in layers]
    fig, ax = _figure()
    colors = ["tab:red" if layer in selection.layers else "tab:gray" for layer in layers]
    ax.bar(layers, values, color=colors, width=0.8)
    k_set = selection.details.get("K")
    if k_set:
        ax.axvspan(min(k_set) - 0.5, max(k_set) + 0.5, color="tab:blue", alpha=0.08, label="K (before the overlap peak)")
    peak = selection.details.get("peak_layer")
    if peak is not None:
        ax.axvline(peak, color="tab:blue", ls=":", lw=1.2, label=f"overlap peak (layer {peak})")
    if selection.threshold is not None:
        ax.axhline(selection.threshold, color="black", ls="--", lw=1.2, label=f"threshold {selection.threshold:.3g}")
    from matplotlib.patches import Patch

    handles, _ = ax.get_legend_handles_labels()
    handles.append(Patch(color="tab:red", label=f"selected {selection.layers}"))
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{selection.criterion} score")
    ax.set_title(f"Criterion {selection.criterion!r}: score per layer")
    ax.set_xticks(layers)
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(handles=handles, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _finish(fig, path, formats)


def plot_overlap_comparison(
    before: ActivationStats,
    after: ActivationStats,
    path: PathLike | None = None,
    *,
    reference: str = "en",
    tau: float = 0.5,
    method: str = "ratio",
    labels: tuple[str, str] = ("before", "after"),
    formats: Sequence[str] = FORMATS,
) -> Figure:
    """Average overlap with ``reference`` per layer for two statistics (paper Fig. 6).

    Left: the two AVG curves. Right: the per-language change (after - before).
    Both statistics must cover the same layers and share the reference.
    """
    if before.layers != after.layers:
        raise InvalidInputError(f"the two statistics cover different layers ({before.layers} vs {after.layers})")
    common = [g for g in before.groups if g in after.groups]
    if reference not in common or len(common) < 2:
        raise InvalidInputError(
            f"both statistics need {reference!r} and another common language; common: {common}"
        )
    b = before.subset(common).overlap(reference, tau, method)
    a = after.subset(common).overlap(reference, tau, method)
    order, layers = _rows(before)
    fig, _ = _figure(11.0, 4.2)
    fig.clear()
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(layers, b.average[order].tolist(), marker="o", ms=3, lw=2, label=f"{labels[0]} (AVG)")
    ax1.plot(layers, a.average[order].tolist(), marker="s", ms=3, lw=2, label=f"{labels[1]} (AVG)")
    ax1.set_xlabel("layer")
    ax1.set_ylabel(f"overlap with {reference}")
    ax1.set_title("Average overlap")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    for g, name in enumerate(common):
        if name != reference:
            ax2.plot(layers, (a.per_group[order, g] - b.per_group[order, g]).tolist(), lw=1, label=name)
    ax2.axhline(0, color="black", lw=0.8)
    ax2.set_xlabel("layer")
    ax2.set_ylabel(f"change in overlap ({labels[1]} - {labels[0]})")
    ax2.set_title("Per language")
    ax2.grid(alpha=0.3)
    ax2.legend(ncol=3, fontsize=7)
    return _finish(fig, path, formats)


def plot_all(
    stats: ActivationStats,
    out_dir: PathLike,
    *,
    selection: Selection | None = None,
    compare: ActivationStats | None = None,
    reference: str = "en",
    tau: float = 0.5,
    formats: Sequence[str] = FORMATS,
    labels: tuple[str, str] = ("before", "after"),
) -> list[Path]:
    """Write every figure that applies into ``out_dir``; returns the files written.

    ``activation_ratio``, ``overlap`` (if ``reference`` is present),
    ``selection_<criterion>`` (if ``selection`` is given, default: ``msd`` when
    possible) and ``overlap_comparison`` (if ``compare`` is given).
    """
    out = Path(out_dir)
    written: list[Path] = []
    figs: list[tuple[str, Any]] = [("activation_ratio", lambda: plot_activation_ratio(stats))]
    has_ref = reference in stats.groups and len(stats.groups) > 1
    if has_ref:
        figs.append(("overlap", lambda: plot_overlap(stats, reference=reference, tau=tau)))
    if selection is None and has_ref:
        from .selection import select

        selection = select(stats, "msd", reference=reference, tau=tau)
    if selection is not None:
        figs.append((f"selection_{selection.criterion}", lambda: plot_selection(selection)))
    if compare is not None:
        figs.append(
            ("overlap_comparison", lambda: plot_overlap_comparison(stats, compare, reference=reference, tau=tau, labels=labels))
        )
    for name, make in figs:
        written += save_figure(make(), out / name, formats)
    return written


def check_colours(n_langs: int) -> None:
    """Refuse more languages than :data:`LANG_COLORS` can tell apart."""
    if n_langs > len(LANG_COLORS):
        raise InvalidInputError(
            f"{n_langs} languages; at most {len(LANG_COLORS)} get distinct colours: pass fewer (--langs)"
        )


def plot_representations(
    model: Any,
    tokenizer: Any,
    texts: dict[str, Sequence[str]],
    layers: Sequence[int],
    *,
    trained: Any = None,
    method: str = "pca",
    labels: tuple[str, str] = ("base", "trained"),
    batch_size: int = 8,
    seed: int = 0,
    path: PathLike | None = None,
    formats: Sequence[str] = FORMATS,
) -> Figure:
    """Last-token hidden states of parallel texts, projected to 2-D and coloured by language (Fig. 10).

    One row per layer; one column for ``model`` and, if given, one for
    ``trained`` (the same base after training, e.g. a
    :class:`~layerselect.selective_ffn.SelectiveFFNModel`). With ``trained`` the
    projection of a layer is fitted on both models' states together, so the two
    panels share their axes. ``method``: ``"pca"`` (default) or ``"tsne"``
    (scikit-learn). Up to 20 languages get distinct colours (:data:`LANG_COLORS`).
    To draw states you already have (and measure them with
    :func:`~layerselect.representations.parallel_alignment`), use
    :func:`plot_state_projections`.

    Example:
        >>> fig = plot_representations(base, tok, texts, [0, 9], trained=slam,
        ...                            path="figs/representations.png")   # doctest: +SKIP
    """
    from .representations import last_token_states

    check_colours(len(texts))  # before any forward pass
    models = [model] if trained is None else [model, trained]
    computed = [last_token_states(m, tokenizer, texts, layers, batch_size=batch_size) for m in models]
    return plot_state_projections(
        [states for states, _ in computed], computed[0][1], layers,
        labels=labels if trained is not None else ("model",), method=method, seed=seed, path=path, formats=formats,
    )


def plot_state_projections(
    states: Sequence[dict[int, Any]],
    langs: Sequence[str],
    layers: Sequence[int],
    *,
    labels: Sequence[str] = ("base", "trained"),
    method: str = "pca",
    seed: int = 0,
    path: PathLike | None = None,
    formats: Sequence[str] = FORMATS,
) -> Figure:
    """Draw precomputed states (one ``{layer: [n_texts, hidden]}`` dict per model) side by side.

    ``langs[i]`` is the language of row ``i`` in every model's states; ``labels``
    names the columns. Each layer's projection is fitted on all models' states
    together, so a row of panels shares its axes.

    Example:
        >>> states, langs = last_token_states(base, tok, texts, [0, 9])            # doctest: +SKIP
        >>> fig = plot_state_projections([states], langs, [0, 9], labels=["base"])  # doctest: +SKIP
    """
    import numpy as np  # comes with matplotlib: this function needs the plots extra anyway
    import torch

    from .representations import project_2d

    row_langs = np.array(list(langs))
    order = list(dict.fromkeys(langs))
    check_colours(len(order))
    if len(labels) < len(states):
        raise InvalidInputError(f"{len(states)} models to draw but only {len(labels)} labels")
    fig, _ = _figure(4.2 * len(states) + 1.4, 3.6 * len(layers))
    fig.clear()
    axes = fig.subplots(len(layers), len(states), squeeze=False)
    for r, layer in enumerate(layers):
        joint = torch.cat([torch.as_tensor(st[layer], dtype=torch.float64) for st in states])
        xy = project_2d(joint, method=method, seed=seed).numpy()
        n = len(row_langs)
        for c in range(len(states)):
            ax = axes[r][c]
            part = xy[c * n : (c + 1) * n]
            for k, lang in enumerate(order):
                sel = row_langs == lang
                ax.scatter(part[sel, 0], part[sel, 1], s=14, color=LANG_COLORS[k], label=lang, alpha=0.85,
                           edgecolors="none")
            ax.set_title(f"{labels[c]}: layer {layer} ({method.upper() if method == 'pca' else 't-SNE'})", fontsize=9)
            ax.tick_params(labelsize=7)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside right upper", fontsize=8, title="language")
    return _finish(fig, path, formats)
