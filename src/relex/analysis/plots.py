"""PNG plots of analyses (matplotlib, from the [lab] extra, imported only when a plot is asked for)."""

from __future__ import annotations

from pathlib import Path


def plot_backtest(rows: list[dict], path: Path) -> None:
    """Relative error against horizon, one line per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r["setting"] for r in rows):
        points = sorted((r["horizon"], r["relative_error"]) for r in rows if r["setting"] == label)
        ax.plot(*zip(*points), marker="o", label=label, linewidth=2 if label == "relex linear" else 1)
    ax.set_xlabel("horizon (last observed step / prefix end)")
    ax.set_ylabel("relative weight error")
    ax.set_title("Backtest inside the observed window")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
