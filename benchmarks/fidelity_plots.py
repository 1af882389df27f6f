"""The fidelity benchmark's pictures: mean accuracy against keep per scorer, TCESS heatmaps, and
accuracy and logit differences per expert dtype."""

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


def plot_dtypes(comparison: dict, path: Path) -> Path:
    """Per expert dtype, against keep: mean accuracy (left) and the max logit difference to the
    bfloat16 experts (right), beside what computing in bfloat16 itself changes when measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (accuracy, logits) = plt.subplots(1, 2, figsize=(10, 4))
    expert_dtypes = dict.fromkeys(r["expert_dtype"] for r in comparison["rows"])
    for index, expert_dtype in enumerate(expert_dtypes):
        rows = sorted(
            (r for r in comparison["rows"] if r["expert_dtype"] == expert_dtype), key=lambda r: r["keep"]
        )
        keeps = [r["keep"] for r in rows]
        style = {
            "marker": "osD^v"[index % 5],
            "color": f"C{index}",  # one colour per dtype in both panels
            "markerfacecolor": "none",
            "label": f"{expert_dtype} experts",
        }
        accuracy.plot(keeps, [100 * r["mean"] for r in rows], **style)
        if expert_dtype != comparison["baseline"]:
            logits.plot(keeps, [r["max_logit_diff_vs_bfloat16"] for r in rows], **style)
    if comparison.get("float32_reference"):
        rows = sorted(comparison["float32_reference"], key=lambda r: r["keep"])
        logits.plot(
            [r["keep"] for r in rows],
            [r["max_logit_diff_vs_bfloat16"] for r in rows],
            color="black",
            linestyle="--",
            linewidth=1,
            label="float32 store, float32 compute",
        )
    keeps = sorted({r["keep"] for r in comparison["rows"]})
    for axes in (accuracy, logits):
        axes.set_xscale("log", base=2)
        axes.set_xticks(keeps, [f"{k:.0%}" for k in keeps])
        axes.set_xlabel("experts kept per layer")
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    accuracy.set_ylabel("mean exact-match accuracy (%)")
    accuracy.set_title(f"Accuracy by expert dtype ({comparison['compute_dtype']} compute)")
    logits.set_ylabel("max |logit - bfloat16 experts' logit|")
    logits.set_title("Logit difference to bfloat16 experts (same experts)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
