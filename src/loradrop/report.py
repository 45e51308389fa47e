"""Figures and tables for LoRA-drop's analysis, and atomic result files.

The figures are the paper's: per-layer histograms of ||Delta W x||^2 (Figure 2), the importance
heatmap across layers, module types and tasks (Figure 4) and importance against the probe's sample
ratio (Figure 5). They are drawn on ``matplotlib.figure.Figure`` objects, never through pyplot, so
no GUI backend is touched and nothing global is left behind on a headless training node.

Every file is written atomically with ``adapter_io``'s helpers (``atomic_write_bytes``,
``write_json``, re-exported here): a temporary file in the target directory, then ``os.replace``, so
a crash or a failed serialisation never leaves a truncated ``results.json`` or figure behind, and a
reader polling the file sees either the old or the new version.
"""

from __future__ import annotations

import io
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from numbers import Integral, Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from .adapter_io import atomic_write_bytes, write_json  # noqa: F401 (write_json: re-exported)
from .selection import Importance, Plan

if TYPE_CHECKING:
    import torch

    from .sites import Site

_DPI = 150
_ANNOTATE_MAX_COLUMNS = 16  # beyond this a cell is too narrow for a printed value
_ANNOTATE_MAX_ROWS = 24
_LOG_SPAN = 1e3  # histograms switch to a log x-axis when the values span this many times
_MARK_COLOUR = "#e8112d"


def _save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Renders ``fig`` in the format the suffix names (png, pdf, svg, ...) and writes it atomically."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(f"cannot save a figure as {path.name!r}: the suffix must be one of {sorted(supported)}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=_DPI)
    return atomic_write_bytes(path, buffer.getvalue())


# -- input checks ----------------------------------------------------------------------------------
def _layer_index(key: Any, where: str) -> int:
    """Layer keys are ints, or int strings once importance went through JSON."""
    if isinstance(key, Integral) and not isinstance(key, bool):
        return int(key)
    if isinstance(key, str) and key.strip().isdigit():
        return int(key)
    raise ValueError(f"{where}: layer key {key!r} is not a layer index (a non-negative integer)")


def _layer_scores(scores: Any, where: str) -> dict[int, float]:
    """One module type's layer -> importance, checked: non-empty, finite and non-negative."""
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError(f"{where}: expected a non-empty dict of layer -> importance, got {scores!r:.80}")
    checked: dict[int, float] = {}
    for key, value in scores.items():
        layer = _layer_index(key, where)
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{where}, layer {layer}: importance {value!r} is not a finite number >= 0")
        checked[layer] = float(value)
    return checked


def _is_nested(mapping: Mapping, where: str) -> bool:
    """Whether the values of ``mapping`` are themselves dicts of dicts (one Importance per run).
    Empty values say nothing either way; the callers reject them with a message naming them."""
    kinds = {all(isinstance(x, Mapping) for x in v.values()) for v in mapping.values() if isinstance(v, Mapping) and v}
    if len(kinds) > 1:
        raise ValueError(f"{where}: mixes per-type importance with per-run importance; pass one kind")
    return kinds == {True}


# -- Figure 4: importance heatmap ------------------------------------------------------------------
def _importance_rows(importance: Importance | Mapping[str, Importance]) -> list[tuple[str | None, str, dict[int, float]]]:
    """(run name or None, module type, layer scores) per heatmap row, in the order given."""
    if not importance:
        raise ValueError("importance is empty: it needs at least one module type with one layer")
    if not _is_nested(importance, "importance"):
        return [(None, t, _layer_scores(s, f"module type {t!r}")) for t, s in importance.items()]
    rows = []
    for run, per_type in importance.items():
        if not per_type:
            raise ValueError(f"importance of run {run!r} is empty: it needs at least one module type")
        rows += [(run, t, _layer_scores(s, f"run {run!r}, module type {t!r}")) for t, s in per_type.items()]
    return rows


def _matrix(rows: Sequence[Mapping[int, float]]) -> tuple[list[int], np.ndarray]:
    """All layers of any row, and a rows x layers matrix with NaN where a row lacks the layer."""
    layers = sorted({layer for row in rows for layer in row})
    matrix = np.full((len(rows), len(layers)), np.nan)
    column = {layer: j for j, layer in enumerate(layers)}
    for i, row in enumerate(rows):
        for layer, value in row.items():
            matrix[i, column[layer]] = value
    return layers, matrix


def _heatmap_matrix(importance: Importance | Mapping[str, Importance]) -> tuple[list[str], list[int], np.ndarray]:
    """(row labels, layers, I_i / max_j I_j per row): the paper divides each type's importance by
    its maximum so that tasks and types with different numbers of layers share one colour scale."""
    rows = _importance_rows(importance)
    labels = [t if run is None else f"{run}/{t}" for run, t, _ in rows]
    for label, (_, _, scores) in zip(labels, rows):
        if max(scores.values()) <= 0:
            raise ValueError(f"importance of {label!r} is zero in every layer: it cannot be scaled by its maximum")
    layers, matrix = _matrix([scores for _, _, scores in rows])
    return labels, layers, matrix / np.nanmax(matrix, axis=1, keepdims=True)


def _retained_mask(importance: Importance | Mapping[str, Importance], layers: list[int],
                   plan: Plan | Mapping[str, Plan]) -> np.ndarray:
    """True where the plan (one per run for several runs) keeps the row's module type's own LoRA."""
    rows = _importance_rows(importance)
    several = rows[0][0] is not None
    if several != isinstance(plan, Mapping):
        raise ValueError("plan must be a Plan for one run's importance, or a dict of run name -> Plan for several runs")
    mask = np.zeros((len(rows), len(layers)), dtype=bool)
    for i, (run, module_type, _) in enumerate(rows):
        if several and run not in plan:
            raise ValueError(f"no plan for run {run!r}; plans are given for {sorted(plan)}")
        run_plan = plan[run] if several else plan
        if module_type not in run_plan.retained:
            raise ValueError(f"the plan has no module type {module_type!r}; it has {sorted(run_plan.retained)}")
        kept = set(run_plan.retained[module_type])
        mask[i] = [layer in kept for layer in layers]
    return mask


def _heatmap_figure(matrix: np.ndarray, row_labels: list[str], layers: list[int], *, colour_label: str,
                    value_format: str, title: str | None, ylabel: str | None = None,
                    marks: np.ndarray | None = None, mark_label: str = "") -> Figure:
    """A rows x layers heatmap with blank cells for NaN, values printed when the grid is small
    enough to read them, and boxed cells where ``marks`` is True."""
    nrows, ncols = matrix.shape
    fig = Figure(figsize=(max(4.5, 2.2 + 0.45 * ncols), max(2.4, 1.3 + 0.38 * nrows)), layout="constrained")
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    vmax = float(np.nanmax(matrix)) or 1.0
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto",
                      interpolation="nearest")
    ax.set_xticks(range(ncols), [str(layer) for layer in layers])
    ax.set_yticks(range(nrows), row_labels)
    ax.set_xlabel("layer")
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, label=colour_label, shrink=0.9)
    if ncols <= _ANNOTATE_MAX_COLUMNS and nrows <= _ANNOTATE_MAX_ROWS:
        for (i, j), value in np.ndenumerate(matrix):
            if not np.isnan(value):
                ax.text(j, i, format(value, value_format), ha="center", va="center", fontsize=7,
                        color="white" if value < 0.5 * vmax else "black")
    if marks is not None:
        for i, j in np.argwhere(marks):
            ax.add_patch(Rectangle((j - 0.45, i - 0.45), 0.9, 0.9, fill=False, edgecolor=_MARK_COLOUR, linewidth=1.8))
        fig.legend(handles=[Patch(fill=False, edgecolor=_MARK_COLOUR, linewidth=1.8, label=mark_label)],
                   loc="outside lower right", frameon=False, fontsize=8)
    return fig


def importance_heatmap(importance: Importance | Mapping[str, Importance], path: str | os.PathLike,
                       plan: Plan | Mapping[str, Plan] | None = None, title: str | None = None) -> Path:
    """The paper's Figure 4: layers (x) by module type (y), each cell I_i / max_j I_j of its row.

    ``importance`` is one run's ``{type: {layer: I}}`` (g works too: scaling by the maximum makes I
    and g the same picture), or ``{run name: {type: {layer: I}}}`` to compare tasks or seeds, with
    rows labelled ``run/type``. With ``plan`` (a ``Plan``, or a dict of run name -> Plan for
    several runs) the layers that keep their own LoRA are boxed. Layers a type lacks stay blank.
    """
    labels, layers, matrix = _heatmap_matrix(importance)
    marks = None if plan is None else _retained_mask(importance, layers, plan)
    fig = _heatmap_figure(matrix, labels, layers, colour_label="I / max I", value_format=".2f",
                          title=title or "LoRA importance by layer", marks=marks,
                          mark_label="retained (own LoRA)")
    return _save_figure(fig, path)


# -- Figure 5: importance against sample ratio ----------------------------------------------------
def _sample_ratio_matrix(importances: Mapping[float, Mapping[int, float] | Importance],
                         module_type: str) -> tuple[list[float], list[int], np.ndarray]:
    """(sample ratios ascending, layers, I) for one module type; each value of ``importances`` is
    that type's ``{layer: I}`` or a whole ``{type: {layer: I}}`` to pick ``module_type`` from."""
    if not importances:
        raise ValueError("importances is empty: it needs at least one sample ratio")
    nested = _is_nested(importances, "importances")
    by_ratio: dict[float, dict[int, float]] = {}
    for key, entry in importances.items():
        ratio = float(key)
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"sample ratio {key!r} is invalid: must be in (0, 1]")
        if nested and module_type not in entry:
            raise ValueError(f"sample ratio {key!r} has no module type {module_type!r}; it has {sorted(entry)}")
        by_ratio[ratio] = _layer_scores(entry[module_type] if nested else entry, f"sample ratio {key!r}")
    ratios = sorted(by_ratio)
    layers, matrix = _matrix([by_ratio[r] for r in ratios])
    return ratios, layers, matrix


def sample_ratio_heatmap(importances: Mapping[float, Mapping[int, float] | Importance], path: str | os.PathLike,
                         module_type: str) -> Path:
    """The paper's Figure 5: one row per probe sample ratio alpha, one column per layer, values I of
    ``module_type``, unscaled, so that a stable ranking across alpha shows as stable columns."""
    ratios, layers, matrix = _sample_ratio_matrix(importances, module_type)
    fig = _heatmap_figure(matrix, [f"{r:g}" for r in ratios], layers, colour_label="importance I",
                          value_format=".3f", ylabel="sample ratio α",
                          title=f"Importance of {module_type} LoRA by sample ratio")
    return _save_figure(fig, path)


# -- Figure 2: per-example output norms -----------------------------------------------------------
def _norms_by_layer(example_norms: Mapping[Site, torch.Tensor]) -> dict[int, dict[str, np.ndarray]]:
    """layer -> module type -> per-example ||Delta W x||^2, layers and types sorted."""
    if not example_norms:
        raise ValueError("example_norms is empty: record them with evaluate_importance(..., record_examples=True)")
    grouped: dict[int, dict[str, np.ndarray]] = {}
    for site, norms in sorted(example_norms.items()):
        values = np.asarray(norms, dtype=np.float64)
        if values.ndim != 1 or values.size == 0:
            raise ValueError(f"site {site.name!r}: expected a non-empty 1-D tensor of per-example norms, "
                             f"got shape {tuple(values.shape)}")
        if not np.isfinite(values).all():
            raise ValueError(f"site {site.name!r}: its output norms are not all finite")
        per_type = grouped.setdefault(site.layer, {})
        if site.module_type in per_type:
            raise ValueError(f"two sites are module type {site.module_type!r} of layer {site.layer}")
        per_type[site.module_type] = values
    return grouped


def _bin_edges(values: Iterable[np.ndarray], bins: int) -> tuple[np.ndarray, bool]:
    """Bin edges shared by every histogram, so layers compare at a glance, and whether they are
    logarithmic: squared norms of layers that barely matter sit decades below those that do."""
    pooled = np.concatenate(list(values))
    lo, hi = float(pooled.min()), float(pooled.max())
    if lo > 0 and hi / lo >= _LOG_SPAN:
        return np.geomspace(lo, hi, bins + 1), True
    return np.histogram_bin_edges(pooled, bins=bins), False


def output_norm_histograms(example_norms: Mapping[Site, torch.Tensor], path: str | os.PathLike,
                           bins: int = 40) -> Path:
    """The paper's Figure 2: per layer, the histogram of per-example ||Delta W x||^2, one colour
    per module type, on a shared x-axis (logarithmic when the values span three decades or more)."""
    if isinstance(bins, bool) or not isinstance(bins, Integral) or bins < 1:
        raise ValueError(f"bins={bins!r} is invalid: must be an integer >= 1")
    grouped = _norms_by_layer(example_norms)
    types = sorted({t for per_type in grouped.values() for t in per_type})
    colours = {t: matplotlib.colormaps["tab10"](k % 10) for k, t in enumerate(types)}
    edges, log = _bin_edges((v for per_type in grouped.values() for v in per_type.values()), int(bins))
    ncols = min(len(grouped), max(4, math.ceil(math.sqrt(len(grouped)))))
    nrows = math.ceil(len(grouped) / ncols)
    fig = Figure(figsize=(2.6 * ncols, 1.9 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharex=True, squeeze=False).ravel()
    for ax, (layer, per_type) in zip(axes, grouped.items()):
        for module_type, values in per_type.items():
            ax.hist(values, bins=edges, histtype="stepfilled", alpha=0.55, color=colours[module_type])
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.tick_params(labelsize=7)
        if log:
            ax.set_xscale("log")
    for ax in axes[len(grouped):]:
        ax.set_visible(False)
    fig.supxlabel("per-example ||ΔW x||²", fontsize=9)
    fig.supylabel("examples", fontsize=9)
    fig.legend(handles=[Patch(color=colours[t], alpha=0.55, label=t) for t in types], loc="outside upper center",
               ncols=min(len(types), 6), frameon=False, fontsize=8)
    return _save_figure(fig, path)


# -- tables -----------------------------------------------------------------------------------------
def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _decimals(value: float) -> int | None:
    """Decimals that print ``value`` with four significant digits, or None where fixed-point
    notation reads badly (very small or very large magnitudes) or cannot (NaN, infinities)."""
    magnitude = abs(value)
    if magnitude == 0:
        return 0
    if not 1e-3 <= magnitude < 1e4:  # also None for NaN and infinities
        return None
    return max(0, 3 - math.floor(math.log10(magnitude)))


def _format_float(value: float, decimals: int | None) -> str:
    if decimals is not None:
        return f"{value:.{decimals}f}"
    if not math.isfinite(value):
        return str(value)
    return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.3e}"


def _format_cell(value: Any, std: Any = None) -> str:
    """Ints with thousands separators, floats with four significant digits, ``mean ± std`` with the
    std printed to the mean's decimals so the two line up."""
    if value is None:
        return ""
    if isinstance(value, Integral) and not isinstance(value, bool) and std is None:
        return f"{int(value):,}"
    if _is_number(value):
        decimals = _decimals(float(value))
        text = _format_float(float(value), decimals)
        if std is None:
            return text
        std_decimals = decimals if decimals is not None else _decimals(float(std))
        return f"{text} ± {_format_float(float(std), std_decimals)}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table_columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None) -> list[str]:
    """The columns asked for (each must occur in some row), or every key in first-seen order less
    the ``<name>_std`` keys that are printed next to ``<name>``."""
    seen = list(dict.fromkeys(key for row in rows for key in row))
    if columns is None:
        return [key for key in seen if not (key.endswith("_std") and key.removesuffix("_std") in seen)]
    missing = [c for c in columns if c not in seen]
    if missing:
        raise ValueError(f"results_table: columns {missing} occur in no row; the rows have {seen}")
    return list(columns)


def results_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of result rows (dicts such as ``{"method": "lora-drop", "metric": 0.81}``),
    for READMEs and run logs. A column ``<name>`` with a ``<name>_std`` key in the rows prints as
    ``mean ± std``. Number columns are right-aligned; missing values are blank."""
    if not rows:
        raise ValueError("results_table needs at least one row")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"results_table: row {i} is a {type(row).__name__}, not a dict")
    names = _table_columns(rows, columns)
    cells = [[_format_cell(row.get(c), None if f"{c}_std" in names else row.get(f"{c}_std")) for c in names]
             for row in rows]
    numeric = [all(_is_number(row[c]) for row in rows if row.get(c) is not None) for c in names]
    widths = [max(3, len(name), *(len(r[j]) for r in cells)) for j, name in enumerate(names)]

    def line(values: Sequence[str]) -> str:
        padded = (v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric))
        return "| " + " | ".join(padded) + " |"

    rule = "| " + " | ".join("-" * (w - 1) + ":" if num else "-" * w for w, num in zip(widths, numeric)) + " |"
    return "\n".join([line(names), rule, *(line(r) for r in cells)]) + "\n"


def aggregate_runs(rows: Sequence[Mapping[str, Any]], group_by: Sequence[str] = ("method",),
                   value_keys: Sequence[str] = ("metric",)) -> list[dict[str, Any]]:
    """Mean and sample standard deviation (ddof=1; 0 for a single run) of ``value_keys`` over the
    rows of each ``group_by`` group, e.g. seeds of one method, as ``{<group keys>, <key>,
    <key>_std, n}`` in first-seen group order, ready for ``results_table``. Columns that are
    constant within a group (trainable_params) belong in ``group_by``."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for i, row in enumerate(rows):
        for key in (*group_by, *value_keys):
            if key not in row:
                raise ValueError(f"aggregate_runs: row {i} has no {key!r}; it has {sorted(row)}")
        for key in value_keys:
            if not _is_number(row[key]):
                raise ValueError(f"aggregate_runs: row {i} has {key}={row[key]!r}, which is not a number")
        groups.setdefault(tuple(row[k] for k in group_by), []).append(row)
    aggregated = []
    for group, members in groups.items():
        out: dict[str, Any] = dict(zip(group_by, group))
        for key in value_keys:
            values = [float(m[key]) for m in members]
            out[key] = statistics.fmean(values)
            out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out["n"] = len(members)
        aggregated.append(out)
    return aggregated
