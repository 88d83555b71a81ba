"""Draws the nesting diagrams of the docs into ``docs/assets/`` (SVG), offline, from matta's own rules.

The shaded regions are not drawn by hand: they are the slices that
``matta.nesting.slice_plan`` returns for the granularity shown (rule S1), so the
pictures change if the rules do. Run from the repository root::

    .venv/bin/python docs/scripts/diagrams.py          # or: make diagrams

The output is committed; the SVGs are deterministic (no dates, fixed ids).
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from matta import MLP, Transformer, resolve  # noqa: E402
from matta.nesting import slice_plan  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TA_COLOR, STUDENT_COLOR, MIX_COLOR, EDGE = "#d9dde8", "#3f51b5", "#9fa8da", "#5c6370"
plt.rcParams.update({"svg.hashsalt": "matta-docs", "svg.fonttype": "path", "font.size": 9})


def _matrix(ax, shape, keep, title, row_label, col_label, groups=None):
    """One kernel as a grid of cells: the TA's full shape, the kept prefix shaded (rule S1)."""
    rows, cols = shape
    ax.add_patch(Rectangle((0, 0), cols, rows, facecolor=TA_COLOR, edgecolor=EDGE, linewidth=1))
    ax.add_patch(Rectangle((0, rows - keep[0]), keep[1], keep[0], facecolor=STUDENT_COLOR, edgecolor=EDGE, linewidth=1))
    for r in range(1, rows):
        ax.plot([0, cols], [r, r], color="white", linewidth=0.4)
    for c in range(1, cols):
        ax.plot([c, c], [0, rows], color="white", linewidth=0.4)
    for axis, size in (groups or {}).items():  # head boundaries: every d_head columns / rows
        for k in range(size, (cols if axis == "cols" else rows), size):
            if axis == "cols":
                ax.plot([k, k], [0, rows], color="black", linewidth=1.2)
            else:
                ax.plot([0, cols], [rows - k, rows - k], color="black", linewidth=1.2)
    ax.set_xlim(-0.5, cols + 0.5)
    ax.set_ylim(-0.5, rows + 0.5)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(col_label, fontsize=8)
    ax.set_ylabel(row_label, fontsize=8)


def _kept(spec, granularity, name):
    """(rows, cols) the slice plan keeps of parameter ``name``."""
    shape = spec.parameters()[name].shape
    for sub, full, slices in slice_plan(spec, resolve(spec, granularity)):
        if full == name:
            return tuple(len(range(*s.indices(n))) for s, n in zip(slices, shape))
    raise KeyError(name)


def nesting(path: Path) -> None:
    """A Student inside the TA: an MLP's three kernels, and a transformer's attention projections."""
    mlp = MLP(d_in=5, hidden=(12, 8), d_out=4)
    g = 0.25
    gpt = Transformer(vocab_size=16, max_len=8, d_model=8, n_layers=1, n_heads=4, d_head=3)
    ga = {"n_heads": 2, "d_model": 6}
    fig, axes = plt.subplots(1, 5, figsize=(11, 3.4), gridspec_kw={"width_ratios": [12, 8, 4, 12, 8]})
    names = ["layers.0.kernel", "layers.1.kernel", "layers.2.kernel"]
    labels = [("d_in (fixed)", "hidden.0"), ("hidden.0", "hidden.1"), ("hidden.1", "classes (fixed)")]
    for ax, name, (r, c) in zip(axes[:3], names, labels):
        _matrix(ax, mlp.parameters()[name].shape, _kept(mlp, g, name), f"MLP {name}", r, c)
    q = "blocks.0.attention.query.kernel"
    o = "blocks.0.attention.output.kernel"
    _matrix(axes[3], gpt.parameters()[q].shape, _kept(gpt, ga, q), "attention query kernel", "d_model",
            "4 heads x d_head 3", {"cols": gpt.d_head})
    _matrix(axes[4], gpt.parameters()[o].shape, _kept(gpt, ga, o), "attention output kernel", "4 heads x d_head 3",
            "d_model", {"rows": gpt.d_head})
    fig.suptitle(
        "TA (grey) and Student (blue): the Student's weights are the top-left prefix of every kernel\n"
        "MLP at granularity 0.25 (hidden 12 -> 3, 8 -> 2); attention at n_heads=2 of 4, d_model=6 of 8 "
        "(whole heads, rule G4)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.86))
    fig.savefig(path, metadata={"Date": None, "Creator": None}, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)


def mixnmatch(path: Path) -> None:
    """Per-block widths of a TA, a Student and a Mix'n'Match model between them."""
    gpt = Transformer(vocab_size=16, max_len=8, d_model=64, n_layers=4, n_heads=4, d_ff=256)
    models = [
        ("TA", 1.0, TA_COLOR),
        ("Mix'n'Match", {"d_ff": [0.25, 0.5, 1.0, 0.75]}, MIX_COLOR),
        ("Student (0.25)", 0.25, STUDENT_COLOR),
    ]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    height = 0.8
    labelled: set[tuple[int, int]] = set()
    for label, granularity, color in models:
        g = resolve(gpt, granularity)
        widths = [g[f"blocks.{i}.d_ff"] for i in range(gpt.n_layers)]
        ax.barh(range(gpt.n_layers), widths, height=height, color=color, edgecolor=EDGE, label=label)
        for i, w in enumerate(widths):
            if (i, w) in labelled:
                continue
            labelled.add((i, w))
            ax.text(w - 3, i, str(w), va="center", ha="right", fontsize=8,
                    color="white" if color == STUDENT_COLOR else "black")
    ax.set_yticks(range(gpt.n_layers), [f"block {i}" for i in range(gpt.n_layers)])
    ax.invert_yaxis()
    ax.set_xlabel("d_ff: the kept prefix of each block's feed-forward units")
    ax.set_xlim(0, 270)
    ax.legend(loc="lower right", fontsize=8, frameon=False, bbox_to_anchor=(1.0, 1.0), ncol=3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_title("Mix'n'Match: one width per block, each a prefix, between the Student and the TA", fontsize=9,
                 loc="left", pad=22)
    fig.tight_layout()
    fig.savefig(path, metadata={"Date": None, "Creator": None})
    plt.close(fig)


def main(out: Path = ASSETS) -> list[Path]:
    """Writes every diagram into ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "nesting.svg", out / "mixnmatch.svg"]
    nesting(paths[0])
    mixnmatch(paths[1])
    return paths


if __name__ == "__main__":
    for p in main(Path(sys.argv[1]) if len(sys.argv) > 1 else ASSETS):
        print(p)
