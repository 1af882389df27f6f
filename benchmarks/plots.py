"""The report's figures. Each names what it compares in its title; every figure is a PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server
import matplotlib.pyplot as plt

_POLICY_ORDER = ("pruned", "prefetch", "lru")
_SHORT = {"pruned": "(a) pruned", "prefetch": "(b) exact+prefetch", "lru": "(c) on-demand LRU"}


def plot_policies(result: dict, path: Path) -> Path:
    """Decode speed relative to all-resident, and misses per token, per policy and budget."""
    ref = result["reference"]["decode_tokens_per_s"]
    budgets = result["budgets"]
    fig, (speed, misses) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(_POLICY_ORDER)
    for i, name in enumerate(_POLICY_ORDER):
        xs = [b + (i - 1) * width for b in range(len(budgets))]
        rows = [next(p for p in budget["policies"] if p["policy"] == name) for budget in budgets]
        speed.bar(xs, [r["decode_tokens_per_s"] / ref for r in rows], width, label=_SHORT[name])
        misses.bar(xs, [r["misses_per_token"] for r in rows], width, label=_SHORT[name])
    labels = [f"keep {b['keep']:.0%}" for b in budgets]
    speed.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="(d) all resident = 1")
    speed.axhline(0.95, color="red", linewidth=0.8, linestyle=":", label="target for (a): 0.95")
    speed.set_ylim(0, 1.35 * max(1.0, *(bar.get_height() for bar in speed.patches)))
    for axis in (speed, misses):
        axis.set_xticks(range(len(budgets)), labels)
        axis.legend(fontsize=8, loc="upper center", ncol=3)
    misses.set_ylim(0, 1.3 * max(0.1, *(bar.get_height() for bar in misses.patches)))
    speed.set_ylabel("decode tokens/s relative to (d)")
    speed.set_title("Decode speed at equal expert memory vs all experts resident")
    misses.set_ylabel("on-demand expert loads per generated token")
    misses.set_title("Expert misses per token: retrieved pattern vs no prediction")
    return _save(fig, path)


def plot_servers(result: dict, path: Path) -> Path:
    """Throughput and TTFT against concurrent clients, taer serve vs each peer configuration."""
    fig, (throughput, ttft) = plt.subplots(1, 2, figsize=(11, 4))
    for server in result["servers"]:
        if "levels" not in server:
            continue
        clients = [level["clients"] for level in server["levels"]]
        throughput.plot(
            clients,
            [level["throughput_tokens_per_s"] for level in server["levels"]],
            marker="o",
            label=server["label"],
        )
        ttft.plot(
            clients, [level["ttft_ms_p50"] for level in server["levels"]], marker="o", label=server["label"]
        )
    throughput.set_xlabel("concurrent clients")
    throughput.set_ylabel("generated tokens/s (this machine)")
    throughput.set_title("Throughput: taer serve vs transformers serve, same workload")
    ttft.set_xlabel("concurrent clients")
    ttft.set_ylabel("time to first token, p50 (ms)")
    ttft.set_title("Time to first token: taer serve vs transformers serve")
    for axis in (throughput, ttft):
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    return _save(fig, path)


def plot_memory(result: dict, path: Path) -> Path:
    """Resident expert bytes and process RSS per configuration."""
    rows = result["rows"]
    labels = [r["config"].replace("transformers, plain checkpoint", "transformers") for r in rows]
    fig, (experts, rss) = plt.subplots(1, 2, figsize=(11, 4))
    experts.bar(
        labels, [(r["resident_expert_bytes"] or r["model_bytes"]) / 1e6 for r in rows], color="tab:blue"
    )
    experts.set_ylabel("MB")
    experts.set_title("Resident expert bytes at keep 100/50/25% (transformers: whole model)")
    rss.bar(labels, [r["rss_bytes"] / 1e6 for r in rows], color="tab:orange")
    rss.set_ylabel("MB")
    rss.set_title("Process RSS: taer at keep 100/50/25% vs transformers")
    for axis in (experts, rss):
        axis.tick_params(axis="x", labelrotation=20, labelsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
