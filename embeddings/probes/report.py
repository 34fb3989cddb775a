"""Reports: a probe result as ``result.json``, a short ``report.md`` and PNG plots.

Entry point :func:`write_report` takes the dict a protocol of :mod:`.protocols` returns
(``knn``, ``fewshot``, ``linear``) or a segmentation probe's (``seg``) and writes, per
protocol:

* ``knn`` — ``knn_k_sweep.png`` (validation figures per k, where k was chosen); with test
  predictions, ``confusion_matrix.png`` (single-label) and ``roc.png``;
* ``fewshot`` — ``fewshot_curve.png``;
* ``linear`` — ``linear_c_sweep.png`` (a grid of C), and the prediction plots as for ``knn``;
* ``seg`` — ``dice.png``, ``loss.png`` (with a loss curve) and one ``overlay_{i}.png`` per
  :class:`Overlay`.

A result's ``warnings`` (a list of sentences: a split by patient where some patients are not
known, say) are quoted at the top of ``report.md``. Missing or non-finite figures show as
"n/a" and leave gaps in plots. Plots are drawn on
matplotlib's Agg canvas, without pyplot's global state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..errors import InputError
from .export import save_json

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from numpy.typing import ArrayLike

__all__ = ["Overlay", "ci_cell", "md_table", "pm_cell", "write_report"]

DPI = 110
SIZE = (5.0, 4.0)
WIDE = (9.0, 4.0)
Plots = list[tuple[str, str]]  # (caption, file name)
_BOUNDS = ("value", "low", "high")
_ABOUT = (
    "method", "preset", "model", "space", "level", "kind", "split_seed", "temperature", "draws",
    "k", "n_train", "n_val", "n_test", "n_train_slices", "n_test_slices", "n_test_volumes",
)  # fmt: skip


@dataclass
class Overlay:
    """One slice for a segmentation report: the image (2D float array, any range; None if
    not available), predicted and reference label maps (2D int arrays, same shape, 0 =
    background)."""

    title: str
    image: np.ndarray | None
    pred: np.ndarray
    ref: np.ndarray


# -- formatting ------------------------------------------------------------------------------
def _num(v: Any) -> float:
    """``v`` as a float; NaN when missing or not a number."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _fmt(v: Any) -> str:
    f = _num(v)
    return f"{f:.3f}" if math.isfinite(f) else "n/a"


def ci_cell(cell: Mapping[str, Any] | float | None) -> str:
    """A ``{value, low, high}`` cell (or a bare figure) as ``v [lo, hi]`` (``n/a`` for what
    is missing)."""
    cell = cell if isinstance(cell, Mapping) else {"value": cell}
    v = _fmt(cell.get("value"))
    if v == "n/a" or not all(math.isfinite(_num(cell.get(b))) for b in _BOUNDS[1:]):
        return v
    return f"{v} [{_fmt(cell['low'])}, {_fmt(cell['high'])}]"


def pm_cell(cell: Mapping[str, Any] | None) -> str:
    """A ``{mean, std}`` cell as ``m ± s``."""
    cell = cell or {}
    m, s = _fmt(cell.get("mean")), _fmt(cell.get("std"))
    return m if "n/a" in (m, s) else f"{m} ± {s}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(r) + " |" for r in lines)


def _metrics(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    """The metric names of several scores dicts, in order of first appearance."""
    return list(
        dict.fromkeys(
            m for c in cells for m, v in c.items() if isinstance(v, Mapping) and "value" in v
        )
    )


def _by_number(d: Mapping[str, Any]) -> list[tuple[float, Any]]:
    return sorted(((_num(k), v) for k, v in d.items()), key=lambda kv: kv[0])


# -- drawing ---------------------------------------------------------------------------------
def _figure(size: tuple[float, float] = SIZE, ncols: int = 1) -> tuple[Figure, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    return fig, fig.subplots(1, ncols)


def _save(fig: Figure, directory: Path, name: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(directory / name, dpi=DPI, metadata={"Software": None})
    fig.clear()
    return name


def _line(ax: Axes, x: ArrayLike, v: ArrayLike, lo: ArrayLike, hi: ArrayLike, label: str) -> None:
    """A line with markers and its interval as a band (gaps where a figure is missing)."""
    xa, va, la, ha = (np.asarray(a, float) for a in (x, v, lo, hi))
    (drawn,) = ax.plot(xa, va, marker="o", label=label)
    ok = np.isfinite(la) & np.isfinite(ha)
    la, ha = np.where(ok, la, 0.0), np.where(ok, ha, 0.0)
    ax.fill_between(xa, la, ha, where=ok, color=drawn.get_color(), alpha=0.2, linewidth=0)


def _legend(ax: Axes, loc: Literal["best", "lower right"] = "best") -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc=loc)


def _sweep(ax: Axes, xs: Sequence[float], base: int, xlabel: str, title: str) -> None:
    ax.set_xscale("log", base=base)
    ax.set_xticks(xs, labels=[f"{x:g}" for x in xs])
    ax.set_xticks([], minor=True)
    ax.set(xlabel=xlabel, title=title)
    ax.grid(alpha=0.3)


def _confusion(ax: Axes, y: np.ndarray, pred: np.ndarray, classes: Sequence[str]) -> None:
    """Counts in cells, coloured by the row-normalised fraction."""
    n = len(classes)
    counts = np.zeros((n, n), int)
    np.add.at(counts, (y, pred), 1)
    rows = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, rows, out=np.zeros((n, n)), where=rows > 0)
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for (i, j), c in np.ndenumerate(counts):
        ax.text(j, i, str(c), ha="center", va="center", color="white" if frac[i, j] > 0.5 else "k")
    ax.set_xticks(range(n), labels=classes, rotation=45, ha="right")
    ax.set_yticks(range(n), labels=classes)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (test)")
    ax.figure.colorbar(im, ax=ax, label="fraction of true class")


def _roc(ax: Axes, y: np.ndarray, proba: np.ndarray, classes: Sequence[str]) -> None:
    """One-vs-rest ROC per class (``y``: indicator rows); classes seen with one value only
    are left out."""
    from sklearn.metrics import auc, roc_curve

    for j, name in enumerate(classes):
        ok = np.isfinite(proba[:, j])
        if len(np.unique(y[ok, j])) < 2:
            continue
        fpr, tpr, _ = roc_curve(y[ok, j], proba[ok, j])
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test, OvR)")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), aspect="equal")
    _legend(ax, loc="lower right")


def _prediction_plots(result: Mapping[str, Any], directory: Path) -> Plots:
    p = result.get("predictions")
    if not p:
        return []
    classes = [str(c) for c in p.get("classes") or result["classes"]]
    y, proba = np.asarray(p["y"], int), np.asarray(p["proba"], float).reshape(len(p["y"]), -1)
    out: Plots = []
    if y.ndim == 1:  # class indices; multi-label results give indicator rows
        fig, ax = _figure((5.5, 4.5))
        _confusion(ax, y, proba.argmax(axis=1), classes)
        out.append(("Confusion matrix", _save(fig, directory, "confusion_matrix.png")))
        y = np.eye(len(classes), dtype=int)[y]
    fig, ax = _figure()
    _roc(ax, y, proba, classes)
    return [*out, ("ROC curves", _save(fig, directory, "roc.png"))]


# -- protocols -------------------------------------------------------------------------------
def _knn(result: Mapping[str, Any], directory: Path) -> tuple[str, Plots]:
    test = result.get("test") or {}
    metrics = _metrics([test])
    chosen = _num(result.get("k"))
    table = md_table(["metric", "test [95 % CI]"], [[m, ci_cell(test.get(m))] for m in metrics])
    by_k = _by_number(result.get("val_by_k") or {})
    if not by_k:
        return table, _prediction_plots(result, directory)
    rows = [
        [
            f"{k:g}" + (" (chosen)" if k == chosen else ""),
            *(_fmt((s.get(m) or {}).get("value")) for m in metrics),
        ]
        for k, s in by_k
    ]
    fig, ax = _figure()
    ks = [k for k, _ in by_k]
    for m in metrics:
        v, lo, hi = ([_num((s.get(m) or {}).get(b)) for _, s in by_k] for b in _BOUNDS)
        _line(ax, ks, v, lo, hi, m)
    if math.isfinite(chosen):
        ax.axvline(chosen, ls="--", color="grey", label=f"chosen k = {chosen:g}")
    _sweep(ax, ks, 10, "k (neighbours)", f"kNN on validation: {result.get('label', '')}")
    ax.set_ylabel("validation score")
    _legend(ax)
    plots = [("Validation metrics vs k", _save(fig, directory, "knn_k_sweep.png"))]
    sweep = md_table(["k", *(f"validation {m}" for m in metrics)], rows)
    text = f"Chosen k: {chosen:g} ({result.get('selected_by', 'validation')}).\n\n{table}"
    return f"{text}\n\n{sweep}", plots + _prediction_plots(result, directory)


def _fewshot(result: Mapping[str, Any], directory: Path) -> tuple[str, Plots]:
    by_shots = _by_number(result.get("by_shots") or {})
    heads = list(dict.fromkeys(h for _, s in by_shots for h in s))
    shown = {"balanced_accuracy": "balanced accuracy", "macro_auroc": "macro AUROC"}
    rows = [
        [f"{n:g}", h, *(pm_cell(s.get(h, {}).get(m)) for m in shown)]
        for n, s in by_shots
        for h in heads
        if h in s or not s
    ]
    fig, axes = _figure(WIDE, ncols=2)
    shots = [n for n, _ in by_shots]
    for ax, (m, name) in zip(axes, shown.items(), strict=True):
        for h in heads:
            cells = [s.get(h, {}).get(m) or {} for _, s in by_shots]
            mean = np.asarray([_num(c.get("mean")) for c in cells])
            std = np.asarray([_num(c.get("std")) for c in cells])
            _line(ax, shots, mean, mean - std, mean + std, h)
        _sweep(ax, shots, 2, "shots per class", f"{name} (mean ± std)")
        ax.set_ylabel(name)
        _legend(ax)
    fig.suptitle(f"Few-shot: {result.get('label', '')}")
    plots = [("Few-shot curves", _save(fig, directory, "fewshot_curve.png"))]
    return md_table(["shots", "head", *shown.values()], rows), plots


def _linear(result: Mapping[str, Any], directory: Path) -> tuple[str, Plots]:
    key = next((k for k in result if k.startswith("val_") and k.endswith("_by_c")), None)
    name = "score" if key is None else key[4:-5].replace("_", " ")
    test = result.get("test") or {}
    table = md_table(
        ["metric", "test [95 % CI]"], [[m, ci_cell(test.get(m))] for m in _metrics([test])]
    )
    grid = next((v for k, v in result.items() if k.endswith("_by_setting")), None)
    if isinstance(result.get("setting"), Mapping) and grid is not None:
        chosen = ", ".join(f"{k} {v}" for k, v in result["setting"].items())
        rows = [[s, _fmt(v)] for s, v in grid.items()]
        metric = (result.get("head") or {}).get("val_metric", "score")
        sweep = md_table(["setting", f"validation {metric}"], rows) if rows else ""
        text = f"Chosen setting: {chosen} (best validation {metric}).\n\n{table}"
        return f"{text}\n\n{sweep}".rstrip(), _prediction_plots(result, directory)
    c = _num(result.get("c"))
    chosen = f"{c:g}" if math.isfinite(c) else "n/a"
    on = result.get("selected_by") or f"best validation {name}"
    table = f"Chosen C: {chosen} ({on}).\n\n{table}"
    if key is None:
        return table, _prediction_plots(result, directory)
    grid = _by_number(result[key])
    fig, ax = _figure()
    cs = [g for g, _ in grid]
    ax.plot(cs, [_num(v) for _, v in grid], marker="o")
    if math.isfinite(c):
        ax.axvline(c, ls="--", color="grey", label=f"chosen C = {chosen}")
    _legend(ax)
    _sweep(ax, cs, 10, "C (inverse regularisation)", f"Linear: {result.get('label', '')}")
    ax.set_ylabel(f"validation {name}")
    plots = [("Validation score vs C", _save(fig, directory, "linear_c_sweep.png"))]
    return table, plots + _prediction_plots(result, directory)


def _seg(result: Mapping[str, Any], directory: Path) -> tuple[str, Plots]:
    d2, d3 = result.get("dice_2d") or {}, result.get("dice_3d") or {}
    names = [str(c) for c in result.get("classes", [])[1:]] or _metrics([d2, d3])
    rows = [[n, ci_cell(d2.get(n)), ci_cell(d3.get(n))] for n in names]
    fig, ax = _figure()
    x, w = np.arange(len(names)), 0.38
    for shift, label, dice in ((-w / 2, "2D (per slice)", d2), (w / 2, "3D (per volume)", d3)):
        v, lo, hi = (np.asarray([_num((dice.get(n) or {}).get(b)) for n in names]) for b in _BOUNDS)
        err = np.nan_to_num(np.clip(np.stack([v - lo, hi - v]), 0, None))
        ax.bar(x + shift, np.nan_to_num(v), w, yerr=err, capsize=3, label=label)
        for xi in (x + shift)[~np.isfinite(v)]:
            ax.text(xi, 0.02, "n/a", ha="center", va="bottom", fontsize="small")
    ax.set_xticks(x, labels=names, rotation=30 if len(names) > 4 else 0)
    ax.set(ylim=(0, 1), ylabel="Dice", title="Dice per class (95 % CI)")
    _legend(ax)
    plots = [("Dice per class", _save(fig, directory, "dice.png"))]
    if result.get("loss_curve"):
        fig, ax = _figure()
        loss = [_num(v) for v in result["loss_curve"]]
        ax.plot(range(1, len(loss) + 1), loss, marker=".")
        ax.set(xlabel="epoch", ylabel="training loss", title="Training loss")
        ax.grid(alpha=0.3)
        plots.append(("Training loss", _save(fig, directory, "loss.png")))
    header = ["class", "Dice 2D (per slice)", "Dice 3D (per volume)"]
    table = md_table(header, rows)
    if isinstance(result.get("dice"), Mapping):  # method baharoon2023: the reference's figure
        by_lr = [[lr, _fmt(v)] for lr, v in (result.get("val_dice") or {}).items()]
        head = (
            f"Dice pooled over the test slices on the model's canvas, macro over the "
            f"foreground classes (as the reference scores): {ci_cell(result['dice'])}; learning "
            f"rate {result.get('lr')} chosen on {result.get('n_val_slices', 0)} validation "
            f"slices, retrained on {result.get('trained_on', 'train')}."
        )
        sweep = md_table(["learning rate", "validation Dice"], by_lr) if by_lr else ""
        caveats = "\n".join(f"- {c}" for c in result.get("caveats") or ())
        table = "\n\n".join(t for t in (head, sweep, table, caveats) if t)
    return table, plots


def _overlay(o: Overlay, classes: Sequence[str], directory: Path, name: str) -> str:
    """Reference | prediction over the image, one fixed colour per class."""
    import matplotlib
    from matplotlib.patches import Patch

    if o.pred.shape != o.ref.shape or (o.image is not None and o.image.shape != o.ref.shape):
        shapes = (None if o.image is None else o.image.shape, o.ref.shape, o.pred.shape)
        raise InputError(f"overlay {o.title!r}: image/ref/pred shapes {shapes} differ.")
    colours = matplotlib.colormaps["tab10"](np.arange(10))[:, :3]
    fig, axes = _figure((8.0, 4.4), ncols=2)
    for ax, title, lab in zip(axes, ("reference", "prediction"), (o.ref, o.pred), strict=True):
        if o.image is not None:
            ax.imshow(o.image, cmap="gray", interpolation="nearest")
        rgba = np.zeros((*lab.shape, 4))
        fg = lab > 0
        rgba[fg, :3], rgba[fg, 3] = colours[(lab[fg] - 1) % len(colours)], 0.45
        ax.imshow(rgba, interpolation="nearest")
        ax.set(title=title, xticks=[], yticks=[])
    present = sorted((set(np.unique(o.ref)) | set(np.unique(o.pred))) - {0})
    label = [classes[i] if i < len(classes) else str(i) for i in present]
    handles = [Patch(color=colours[(i - 1) % len(colours)], alpha=0.45) for i in present]
    if handles:
        fig.legend(handles, label, loc="outside lower center", ncols=min(len(handles), 5))
    fig.suptitle(o.title)
    return _save(fig, directory, name)


_PROTOCOLS: dict[str, Callable[[Mapping[str, Any], Path], tuple[str, Plots]]] = {
    "knn": _knn,
    "fewshot": _fewshot,
    "linear": _linear,
    "seg": _seg,
}


def write_report(
    result: Mapping[str, Any], directory: str | Path, overlays: Sequence[Overlay] = ()
) -> Path:
    """Write ``result.json``, ``report.md`` and PNG plots into ``directory`` (created if
    missing); returns the ``report.md`` path."""
    protocol = result.get("protocol")
    if protocol not in _PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}; expected one of {', '.join(_PROTOCOLS)}.")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_json(result, out / "result.json")
    table, plots = _PROTOCOLS[protocol](result, out)
    classes = [str(c) for c in result.get("classes", [])]
    for i, o in enumerate(overlays):
        plots.append((o.title, _overlay(o, classes, out, f"overlay_{i}.png")))
    label = result.get("label")
    title = f"# {protocol} probe" + (f" — {label}" if label is not None else "")
    about = ", ".join(
        f"{k.replace('_', ' ')} `{result[k]}`" for k in _ABOUT if result.get(k) is not None
    )
    parts = [title]
    if isinstance(result.get("note"), str):
        parts.append(f"> {result['note']}")
    parts += [f"> **Warning:** {w}" for w in result.get("warnings") or () if isinstance(w, str)]
    parts += [f"The {protocol} probe ran with {about or 'no recorded settings'}.", table]
    parts += [f"![{caption}]({name})" for caption, name in plots]
    path = out / "report.md"
    path.write_text("\n\n".join(parts) + "\n")
    return path
