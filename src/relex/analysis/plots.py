"""PNG plots of analyses (matplotlib, from the [lab] extra, imported only when a plot is asked for)."""

from __future__ import annotations

from pathlib import Path


def plot_backtest(rows: list[dict], path: Path) -> None:
    """Relative error against horizon, one line per setting."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r["setting"] for r in rows):
        points = sorted((r["horizon"], r["relative_error"]) for r in rows if r["setting"] == label)
        ax.plot(*zip(*points), marker="o", label=label, linewidth=2 if label == "relex linear" else 1)
    ax.set_xlabel("horizon (last observed step / prefix end)")
    ax.set_ylabel("relative weight error")
    ax.set_title("Backtest inside the observed window")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(plt, fig, path, dpi=120)


def _save(plt, fig, path: Path, dpi: int = 110) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_coefficients(curves: list[dict], path: Path) -> None:
    """c_1(t) of representative tensors: observed points, the fitted line, and real later projections."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.4), squeeze=False)
    for ax, curve in zip(axes[0], curves):
        ax.plot(curve["steps"], curve["coefficients"], "o", color="tab:blue", label="observed c1(t)")
        if curve.get("later_steps"):
            ax.plot(curve["later_steps"], curve["later_coefficients"], "s", color="tab:gray", mfc="none",
                    label="real later <delta, v1>")
        xs = curve["line_steps"]
        ax.plot(xs, [curve["slope"] * x + curve["intercept"] for x in xs], "-", color="tab:pink", label="linear fit")
        ax.axvline(curve["steps"][-1], color="k", linestyle=":", linewidth=1)
        ax.set_title(f"{curve['name']}\nR^2 {curve['r2']:.3f}", fontsize=8)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("rank-1 coefficient")
    axes[0][0].legend(fontsize=7)
    _save(plt, fig, path)


def plot_explained_variance(cumulative: list[float], path: Path) -> None:
    """Median cumulative explained variance of the top-k components."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ks = list(range(1, len(cumulative) + 1))
    ax.bar(ks, cumulative, color="tab:blue")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(ks)
    ax.set_xlabel("rank k")
    ax.set_ylabel("median cumulative explained variance")
    _save(plt, fig, path)


def plot_alignment(rows: list[dict], path: Path) -> None:
    """Mean per-tensor cosine and norm ratio of the prediction against real later checkpoints."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["mean_cosine"] for r in rows], "o-", label="mean cosine")
    ax.plot(steps, [r["mean_norm_ratio"] for r in rows], "s-", label="mean norm ratio")
    ax.plot(steps, [r["relative_error"] for r in rows], "^-", label="relative error")
    ax.axhline(1.0, color="k", linewidth=0.5)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    ax.set_title("RELEX vs real later checkpoints (weight space)")
    _save(plt, fig, path)


def plot_accuracy(scores: dict[str, dict[str, float]], cutoff: int, path: Path) -> None:
    """Accuracy against step: the real run as a line, every other series as markers."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, series in scores.items():
        points = sorted((int(s), v) for s, v in series.items())
        style = "-" if label == "real" else "o"
        ax.plot(*zip(*points), style, label=label)
    ax.axvline(cutoff, color="k", linestyle=":", linewidth=1, label="cutoff")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    _save(plt, fig, path)
