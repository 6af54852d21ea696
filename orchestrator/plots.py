"""The report's pictures: ``curve.png`` (perplexity along the path), ``mask.png`` (what is kept),
``pareto.png`` (a whole-mask search) and ``recovery/loss.png`` (the recovery fine-tuning's loss).

matplotlib is imported inside the functions and always with the Agg backend: no display is needed,
and importing this module stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from search_spaces import Arch, Mask

#: Marker and colour of each step kind on the curve.
_KIND_STYLE = {
    "attn": ("o", "tab:blue", "attention removed"),
    "mlp": ("s", "tab:orange", "MLP removed"),
    "attn_width": ("v", "tab:green", "heads narrowed"),
    "mlp_width": ("D", "tab:red", "MLP narrowed"),
    "trial": ("*", "tab:purple", "Optuna trial (whole mask)"),
}
#: Beyond this many steps the curve carries no per-point labels (they would only overlap).
MAX_LABELLED_STEPS = 40


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _point_label(step: dict[str, Any]) -> str:
    """Short label of a step on the curve: the layer, and the width kept after a width step."""
    if step["kind"] == "trial":
        return f"trial {step['layer']}"
    if step.get("width") is not None:
        return f"{step['layer']}\u2192{step['width']}"
    return str(step["layer"])


def write_curve(path: dict[str, Any], out: Path) -> None:
    """Calibration perplexity against the removed ratio, one marker per step, coloured by kind."""
    plt = _pyplot()
    steps = path["steps"]
    ratios = [0.0] + [s["ratio"] for s in steps]
    ppls = [path["dense_ppl"]] + [s["ppl"] for s in steps]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=130)
    ax.plot(ratios, ppls, color="0.6", lw=1.2, zorder=1)
    ax.scatter([0.0], [path["dense_ppl"]], marker="*", s=90, color="black", zorder=3, label="dense")
    for kind, (marker, colour, legend) in _KIND_STYLE.items():
        mine = [s for s in steps if s["kind"] == kind]
        if mine:
            ax.scatter([s["ratio"] for s in mine], [s["ppl"] for s in mine], marker=marker, s=30,
                       color=colour, zorder=3, label=legend)
    if len(steps) <= MAX_LABELLED_STEPS:
        for i, s in enumerate(steps):  # alternate above-left / below-right so neighbours do not collide
            above = i % 2 == 0
            ax.annotate(_point_label(s), (s["ratio"], s["ppl"]), fontsize=7, color="0.25",
                        xytext=(-4, 6) if above else (4, -11), textcoords="offset points",
                        ha="right" if above else "left")
    target = path.get("target_ratio")
    if target:
        ax.axvline(target, color="0.4", ls="--", lw=0.8, zorder=0)
        ax.annotate(f"target {target:.0%}", (target, 1.0), xycoords=("data", "axes fraction"), fontsize=7,
                    xytext=(-3, -3), textcoords="offset points", ha="right", va="top", color="0.35")
    ax.set_xlabel("removed parameter ratio")
    ax.set_ylabel("calibration perplexity")
    ax.set_title("removal path (labels: layer, or layer\u2192width kept)", fontsize=10)
    from matplotlib.ticker import PercentFormatter

    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0 if max(ratios) >= 0.05 else 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", frameon=False)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def write_mask(mask: Mask, arch: Arch, out: Path, *, title: str = "") -> None:
    """One column per layer, a row for attention and one for the MLP; the shade is the kept fraction.

    Removed blocks are white with a cross; narrowed blocks carry the width kept (head units, or
    MLP channels) and are shaded by width / full width.
    """
    import numpy as np

    plt = _pyplot()
    n = arch.num_layers
    full = (arch.num_head_units, arch.intermediate_size)
    kept = np.array([[mask.heads_kept(l, full[0]) for l in range(n)],
                     [mask.mlp_kept(l, full[1]) for l in range(n)]], dtype=float)  # (2, layers)
    fraction = kept / np.array(full, dtype=float)[:, None]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.28 * n + 2.2), 2.6), dpi=130)
    image = ax.imshow(fraction, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(np.arange(-0.5, n, 1), minor=True)
    ax.set_yticks([-0.5, 0.5, 1.5], minor=True)
    ax.grid(which="minor", color="0.75", lw=0.6)
    ax.tick_params(which="minor", length=0)
    step = 1 if n <= 40 else 5
    ax.set_xticks(range(0, n, step))
    ax.tick_params(axis="x", labelsize=7 if n <= 40 else 8)
    ax.set_yticks([0, 1])
    heads = f"{full[0]} x {arch.heads_per_unit} heads" if arch.heads_per_unit > 1 else f"{full[0]} heads"
    ax.set_yticklabels([f"attention\n({heads})", f"MLP\n({full[1]} ch)"], fontsize=8)
    ax.set_xlabel("layer")
    for row in range(2):
        for layer in range(n):
            value, share = int(kept[row, layer]), fraction[row, layer]
            if value == 0:
                ax.text(layer, row, "\u00d7", ha="center", va="center", fontsize=11, color="tab:red")
            elif value != full[row]:
                ax.text(layer, row, str(value), ha="center", va="center", rotation=90 if value >= 100 else 0,
                        fontsize=6, color="white" if share > 0.6 else "black")
    bar = fig.colorbar(image, ax=ax, fraction=0.03, pad=0.015)
    bar.set_label("fraction kept", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    ax.set_title(title or "kept structure (\u00d7 removed; numbers: width kept)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (ratio, ppl) points no other point beats: higher ratio and lower perplexity.

    A point is on the front when no other has ratio >= and ppl <= with one of them strict; equal
    points are both kept. Returned in order of increasing ratio.
    """
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], points[i][1]))
    front, best_ppl = [], float("inf")
    for i in order:  # by decreasing ratio: on the front iff cheaper than everything that removes more
        ppl_i = points[i][1]
        if ppl_i < best_ppl or (front and points[front[-1]] == points[i]):
            front.append(i)
            best_ppl = min(best_ppl, ppl_i)
    return sorted(front, key=lambda i: points[i][0])


def write_pareto(search: dict[str, Any], out: Path) -> None:
    """Calibration perplexity against ratio for every completed trial of an Optuna study.

    The front (nothing removes more at a lower perplexity) is highlighted, the ratio band shaded,
    BlockPruner's mask (the warm start) and the best trial marked.
    """
    plt = _pyplot()
    done = [p for p in search["points"] if p["ppl"] is not None and p["ppl"] == p["ppl"]]
    points = [p for p in done if p["origin"] != "repeat"]  # a repeat is a mask already plotted
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=130)
    low, high = search["band"]
    ax.axvspan(low, high, color="0.93", zorder=0, label="ratio band")
    for origin, colour, legend in (("sampler", "tab:blue", "sampled"), ("cache", "0.55", "from the cache")):
        mine = [p for p in points if p["origin"] == origin]
        if mine:
            ax.scatter([p["ratio"] for p in mine], [p["ppl"] for p in mine], s=10, color=colour, alpha=0.6,
                       zorder=2, label=legend)
    front = [points[i] for i in pareto_front([(p["ratio"], p["ppl"]) for p in points])]
    if front:
        ax.step([p["ratio"] for p in front], [p["ppl"] for p in front], where="post", color="tab:red", lw=1.2,
                zorder=3)
        ax.scatter([p["ratio"] for p in front], [p["ppl"] for p in front], s=22, color="tab:red", zorder=4,
                   label=f"front ({len(front)})")
    if search.get("blockpruner"):
        ax.scatter([search["blockpruner"]["ratio"]], [search["blockpruner"]["ppl"]], marker="*", s=110,
                   color="tab:orange", zorder=5, label="BlockPruner (first trial)")
    if search.get("best"):
        ax.scatter([search["best"]["ratio"]], [search["best"]["ppl"]], marker="D", s=110, facecolors="none",
                   edgecolors="black", linewidths=1.2, zorder=6, label="best trial")
    ppls = [p["ppl"] for p in points]
    if ppls and max(ppls) > 10 * min(ppls):  # random early trials can be orders of magnitude worse
        ax.set_yscale("log")
    ax.set_xlabel("removed parameter ratio")
    ax.set_ylabel("calibration perplexity")
    ax.set_title(f"Optuna ({search['sampler']}): {len(done)} completed trials, {len(points)} distinct masks",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", frameon=False)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def write_loss_curve(log: list[dict[str, Any]], out: Path, *, title: str = "") -> None:
    """Training loss against the optimizer step, validation loss as points where the log has it.

    ``log``: the trainer's entries, ``{"step", "loss", "lr", "tokens", "seconds"}`` and sometimes
    ``"val_loss"``. A step logged twice (a resumed run redoes the steps after its last checkpoint)
    is drawn once, with its last value. Non-finite losses (a diverged step logs NaN) are left out
    and counted in the legend; a log without a finite loss still gives a picture that says so.
    When the tokens grow with the steps, a top axis reads them off.
    """
    plt = _pyplot()
    train, val = _by_step(log, "loss"), _by_step(log, "val_loss")
    dropped = sum(1 for e in log if "loss" in e) - len(train)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=130)
    if train:
        ax.plot(*zip(*train), color="tab:blue", lw=1.2, label="training loss" + (
            f" ({dropped} non-finite not shown)" if dropped > 0 else ""))
    if val:
        ax.plot(*zip(*val), color="tab:orange", marker="o", ms=4, lw=0.8, ls="--", label="validation loss")
    if not train and not val:
        ax.text(0.5, 0.5, f"no finite loss in {len(log)} log entries", ha="center", va="center",
                transform=ax.transAxes, color="0.4")
    _tokens_axis(ax, log)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean token cross-entropy)")
    ax.set_title(title or "recovery fine-tuning", fontsize=10)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend(fontsize=7, loc="upper right", frameon=False)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _number(value: Any) -> bool:
    import math

    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _by_step(log: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """(step, value) of the entries with a finite ``key``, by step, the last entry of a step winning."""
    points = {float(e["step"]): float(e[key]) for e in log if _number(e.get("step")) and _number(e.get(key))}
    return sorted(points.items())


def _tokens_axis(ax: Any, log: list[dict[str, Any]]) -> None:
    """A top axis in tokens trained on, from the log's (step, tokens) pairs when both grow together."""
    import numpy as np

    pairs = _by_step(log, "tokens")
    if len(pairs) < 2:
        return
    steps, tokens = np.array(pairs).T  # (2, points)
    if np.any(np.diff(tokens) <= 0):
        return
    top = ax.secondary_xaxis("top", functions=(lambda s: _interp(s, steps, tokens), lambda t: _interp(t, tokens, steps)))
    top.set_xlabel("tokens trained on", fontsize=8)
    top.tick_params(labelsize=7)


def _interp(x: Any, xp: Any, fp: Any) -> Any:
    """``np.interp``, continued linearly beyond both ends (an axis's ticks may lie past the data)."""
    import numpy as np

    x = np.asarray(x, dtype=float)
    y = np.interp(x, xp, fp)
    low, high = (fp[1] - fp[0]) / (xp[1] - xp[0]), (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
    y = np.where(x < xp[0], fp[0] + (x - xp[0]) * low, y)
    return np.where(x > xp[-1], fp[-1] + (x - xp[-1]) * high, y)
