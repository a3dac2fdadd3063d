"""`lamina bench --plot`: tokens/s against threads or GPU layers, one PNG (needs `lamina[plot]`).

matplotlib is imported here only, lazily, with the Agg backend: a plot never opens a window and
lamina itself never needs matplotlib.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import LaminaError

if TYPE_CHECKING:
    from .bench import Result

INSTALL = 'pip install "lamina[plot]"'


def require() -> None:
    """Raise a LaminaError naming the install line when matplotlib is missing (call it before measuring)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise LaminaError(f"--plot needs matplotlib, which is not installed: {INSTALL}") from exc


def render(results: list["Result"], path: str | Path, *, x: str, title: str) -> Path:
    """Draw tokens/s (one subplot per test) against ``x`` ("threads" or "n_gpu_layers"): lamina's
    median with min..max error bars, llama-bench's beside it when it ran, one line per value of
    the dimension not on the axis when both were swept."""
    require()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if x not in ("threads", "n_gpu_layers"):
        raise ValueError(f"x is 'threads' or 'n_gpu_layers', got {x!r}")
    other = "n_gpu_layers" if x == "threads" else "threads"
    tests = list(dict.fromkeys(r.test for r in results))
    # positions on the axis: threads are numbers; layer values ('all', 'auto', ints) are categories
    xs = list(dict.fromkeys(getattr(r, x) for r in results))
    pos: Callable[[Any], float] = (lambda v: float(v)) if x == "threads" else (lambda v: float(xs.index(v)))
    fig, axes = plt.subplots(1, len(tests), figsize=(5.5 * len(tests), 4.5), squeeze=False)
    for ax, test in zip(axes[0], tests):
        rows = [r for r in results if r.test == test]
        groups = list(dict.fromkeys(getattr(r, other) for r in rows))
        sides = [("lamina", "o-")] + ([("llama_bench", "s--")] if any(r.llama_bench for r in rows) else [])
        n_series = len(groups) * len(sides)
        step = 0.15 if x == "n_gpu_layers" else 0.04 * max(xs, key=float)  # side by side, not on top
        i = 0
        for color, g in enumerate(groups):
            for side, style in sides:
                pts = [(pos(getattr(r, x)), getattr(r, side)) for r in rows
                       if getattr(r, other) == g and getattr(r, side)]
                if not pts:
                    continue
                off = (i - (n_series - 1) / 2) * step
                i += 1
                px = [p + off for p, _ in pts]
                med = [statistics.median(s) for _, s in pts]
                err = [[m - min(s) for m, (_, s) in zip(med, pts)], [max(s) - m for m, (_, s) in zip(med, pts)]]
                label = side.replace("_", "-") + (f", {'ngl' if other == 'n_gpu_layers' else 'threads'} {g}"
                                                  if len(groups) > 1 else "")
                ax.errorbar(px, med, yerr=err, fmt=style, color=f"C{color}", capsize=4, label=label)
        ax.set(title=test, ylabel="tokens/s (median, min..max)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if x == "threads":
            ax.set_xlabel("threads")
            ax.set_xticks([float(v) for v in xs])
        else:
            ax.set_xlabel("-ngl requested (layers placed)")
            ax.set_xticks(range(len(xs)))
            # each value over its placement: '4\n(inert: CPU only)', 'all\n(19 layers on RPC0)'
            labels = {r.n_gpu_layers: r.placement.replace(" (", "\n(", 1) for r in rows}
            ax.set_xticklabels([labels.get(v, str(v)) for v in xs])
        ax.legend()
    placements = list(dict.fromkeys(r.placement for r in results))
    if len(placements) == 1:
        title += f"; -ngl {placements[0]}"
    if not any(r.devices for r in results) and any(r.n_gpu_layers not in (None, 0, "auto") for r in results):
        title += "\nno GPU: every layer stayed on the CPU (the -ngl values were inert)"
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
