"""The report's pictures: ``curve.png`` (perplexity along the path) and ``mask.png`` (what is kept).

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
