"""Needle-in-a-haystack grid: context lengths x needle depths, one score per cell, a heatmap PNG.

The needle, the haystack and the scoring are RULER's ``niah_single_2`` (a 7-digit magic number for
an ``adjective-noun`` key in the Paul Graham essays), with the depth fixed per cell. Each cell holds
``samples_per_cell`` samples (different haystack offsets and needles) and its score is their mean
``string_match_all`` in [0, 1]. The heatmap mimics the usual needle figures (x: context length,
y: depth percent, red -> green).
"""

from __future__ import annotations

from typing import Any, Sequence

from .metrics import mean_ci95
from .ruler import RulerGenerator, Sample, score_prediction

DEFAULT_DEPTHS = [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]


def grid_samples(tokenizer: Any, lengths: Sequence[int], depths: Sequence[float] = DEFAULT_DEPTHS,
                 samples_per_cell: int = 1, task: str = "niah_single_2",
                 haystack_path: str | None = None, seed: int = 42,
                 model_template_tokens: int = 0, tokens_to_generate: int = 32) -> list[Sample]:
    g = RulerGenerator(tokenizer, haystack_path, seed, model_template_tokens)
    out = []
    for L in lengths:
        for d in depths:
            for s in g.generate(task, L, samples_per_cell, depth=d, tokens_to_generate=tokens_to_generate):
                s.meta["depth"] = d
                out.append(s)
    return out


def score_grid(records: Sequence[dict]) -> list[dict]:
    """Rows ``{"context", "depth", "score", "ci95", "n"}`` from result records that carry
    ``target_length``, ``meta.depth``, ``outputs`` and ``pred``."""
    cells: dict[tuple, list[float]] = {}
    for r in records:
        key = (r["target_length"], r["meta"]["depth"])
        cells.setdefault(key, []).append(score_prediction(r.get("pred", "") or "", r["outputs"]))
    rows = []
    for (L, d), v in sorted(cells.items()):
        m, hw, n = mean_ci95(v)
        rows.append({"context": L, "depth": d, "score": m, "ci95": hw, "n": n})
    return rows


def plot_heatmap(rows: Sequence[dict], path: str, title: str = "Needle in a haystack") -> str:
    """Write a heatmap PNG of ``score`` over (context, depth); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    lengths = sorted({r["context"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    grid = [[float("nan")] * len(lengths) for _ in depths]
    for r in rows:
        grid[depths.index(r["depth"])][lengths.index(r["context"])] = r["score"]
    cmap = LinearSegmentedColormap.from_list("needle", ["#F0496E", "#EBB839", "#0CD79F"])
    fig, ax = plt.subplots(figsize=(max(4.0, 1.0 + 0.9 * len(lengths)), max(3.0, 0.45 * len(depths) + 1.2)))
    im = ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{L // 1024}K" if L % 1024 == 0 else str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("depth (%)")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            v = grid[i][j]
            if v == v:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    mean = [r["score"] for r in rows]
    ax.set_title(f"{title}  (mean {sum(mean) / max(len(mean), 1):.3f})", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
