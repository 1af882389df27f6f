"""The fidelity benchmark's pictures: mean accuracy against keep per scorer, and TCESS heatmaps."""

from __future__ import annotations

from pathlib import Path

SCORER_STYLES = {  # distinct markers and dashes: scorers that retain the same experts overlap
    "tcess": ("o", "-"),
    "tcess_adaptive": ("s", "--"),
    "frequency": ("D", "-."),
    "mean_prob": ("^", ":"),
    "general": ("v", "--"),
    "random": ("x", ":"),
}


def plot_accuracy(report: dict, path: Path) -> Path:
    """Mean accuracy against keep, one line per scorer, the full model as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for scorer, (marker, dashes) in SCORER_STYLES.items():
        cells = sorted((r for r in report["rows"] if r["scorer"] == scorer), key=lambda r: r["keep"])
        axes.plot(
            [c["keep"] for c in cells],
            [100 * c["mean"] for c in cells],
            marker=marker,
            linestyle=dashes,
            markerfacecolor="none",
            label=scorer,
        )
    axes.axhline(100 * report["full"]["mean"], color="black", linestyle="--", linewidth=1, label="full model")
    axes.set_xscale("log", base=2)
    keeps = sorted({r["keep"] for r in report["rows"]})
    axes.set_xticks(keeps, [f"{k:.1%}" for k in keeps])
    axes.set_xlabel("experts kept per layer")
    axes.set_ylabel("mean exact-match accuracy (%)")
    axes.set_ylim(bottom=0)
    axes.set_title("Pruned accuracy by scorer")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_tcess_heatmap(report: dict, path: Path) -> Path:
    """One panel per task (and ``general``): TCESS by MoE layer (rows) and expert (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    tables = report["tcess"]
    top = max(max(max(row) for row in table) for table in tables.values()) or 1.0
    columns = min(3, len(tables))
    rows = -(-len(tables) // columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(4.2 * columns, 0.6 + 2.2 * rows), squeeze=False, constrained_layout=True
    )
    for ax, (name, table) in zip(axes.flat, tables.items(), strict=False):
        image = ax.imshow(table, aspect="auto", cmap="viridis", vmin=0.0, vmax=top, interpolation="nearest")
        ax.set_yticks(range(len(table)))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_ylabel("MoE layer", fontsize=8)
    for ax in list(axes.flat)[len(tables) :]:
        ax.axis("off")
    figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="TCESS")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
