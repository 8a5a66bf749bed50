"""Plots of the evaluate stage: reward-model score against gold reward, and reward against KL."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """PNG plots plus the points as CSV (DVC plots); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    points = out_dir / "policies.csv"
    with points.open("w") as fh:
        fh.write("policy,kl_per_sequence,rm_score,gold_reward\n")
        for name, res in results.items():
            gold = res.metrics.get("gold_reward", "")
            fh.write(f"{name},{res.metrics['kl_per_sequence']},{res.metrics['rm_score']},{gold}\n")
    written.append(points)

    has_gold = all(res.gold is not None for res in results.values())
    if has_gold:
        fig, ax = plt.subplots(figsize=(5, 4))
        for name, res in results.items():
            ax.scatter(res.gold, res.rm_scores, s=8, alpha=0.5, label=name)
        ax.set_xlabel("gold reward")
        ax.set_ylabel("reward-model score")
        ax.set_title("Proxy vs gold reward (over-optimisation shows as drift)")
        ax.legend()
        fig.tight_layout()
        path = out_dir / "rm_vs_gold.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(5, 4))
    key = "gold_reward" if has_gold else "rm_score"
    for name, res in results.items():
        ax.scatter([res.metrics["kl_per_sequence"]], [res.metrics[key]], s=40, label=name)
        ax.annotate(name, (res.metrics["kl_per_sequence"], res.metrics[key]))
    ax.set_xlabel("KL to reference (nats / sequence)")
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title("Reward against KL")
    fig.tight_layout()
    path = out_dir / "reward_vs_kl.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written
