"""The over-optimisation curve of a policy-training stage (Gao et al. 2022): ``plots/<stage>/overoptimization.csv``,
``overoptimization.png`` and its summary in ``metrics/<stage>.json``, from the ``eval/overopt/...`` points the trainer
logged at each evaluation (``rlhf_core.overoptimization``; the PPO, GRPO and DPO stages call it)."""

from __future__ import annotations

import csv
from pathlib import Path

from tasks.training_io import CurveRecorder

OVEROPT_CSV = "overoptimization.csv"
OVEROPT_PNG = "overoptimization.png"
OVEROPT_COLUMNS = ("step", "kl", "sqrt_kl", "proxy_reward", "gold_reward", "proxy_fit", "gold_fit")


def write_overoptimization(stage: str, curves: CurveRecorder, out_dir: Path) -> dict[str, float]:
    """The over-optimisation curve of a policy stage (Gao et al. 2022) from its logged ``eval/overopt/...`` points.

    Writes ``<out_dir>/overoptimization.csv`` (one row per evaluation: KL, sqrt(KL), proxy and gold reward, and the
    fitted curves at that sqrt(KL)) and ``overoptimization.png`` (proxy and gold minus the initial policy's against
    sqrt(KL), with the fitted ``R(d) = d(α − β·log d)``); returns the summary for ``metrics/<stage>.json``
    (``rlhf_core.overoptimization.summarize``: fitted α, β, the checkpoint of peak gold reward, the last point).
    Both files are written even without points (a header-only CSV, an empty plot): ``dvc.yaml`` declares them.
    """
    import math

    import torch

    from rlhf_core import metrics as M
    from rlhf_core.overoptimization import CurvePoint, rl_curve, summarize

    names = {n: M.key(M.EVAL, n) for n in (M.OVEROPT_PROXY, M.OVEROPT_GOLD, M.OVEROPT_KL)}
    points = [CurvePoint(step=step, proxy=row[names[M.OVEROPT_PROXY]], kl=row[names[M.OVEROPT_KL]],
                         gold=row.get(names[M.OVEROPT_GOLD]))
              for step, row in sorted(curves.rows.get(M.EVAL, {}).items())
              if names[M.OVEROPT_PROXY] in row and names[M.OVEROPT_KL] in row]
    summary, fits = summarize(points)
    base = {"proxy": points[0].proxy, "gold": points[0].gold} if points else {}
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / OVEROPT_CSV).open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(OVEROPT_COLUMNS)
        for p in sorted({p.step: p for p in points}.values(), key=lambda p: p.step):
            d = math.sqrt(max(p.kl, 0.0))
            fitted = {name: base[name] + float(rl_curve(torch.tensor([d]), fit.alpha, fit.beta)[0]) for name, fit in fits.items()}
            writer.writerow([p.step, p.kl, d, p.proxy, "" if p.gold is None else p.gold, fitted.get("proxy", ""),
                             fitted.get("gold", "")])
    _plot_overoptimization(stage, points, fits, out_dir / OVEROPT_PNG)
    if points and not fits:
        why = ("no evaluation of the initial policy (eval_on_start)" if min(p.step for p in points) != 0
               else "fewer than 2 evaluations away from the initial policy")
        print(f"[rlhf] {stage}: over-optimisation curve of {len(points)} points, no R(d) fit: {why}")
    return summary


def _plot_overoptimization(stage: str, points: list, fits: dict, path: Path) -> None:
    import math

    import matplotlib

    matplotlib.use("Agg")  # no display on workers
    import matplotlib.pyplot as plt
    import torch

    from rlhf_core.overoptimization import rl_curve

    fig, ax = plt.subplots(figsize=(6, 4.5))
    if points:
        points = sorted(points, key=lambda p: p.step)
        d = [math.sqrt(max(p.kl, 0.0)) for p in points]
        relative = points[0].step == 0  # rewards minus the initial policy's, as Gao et al. plot them
        series = {"proxy": [p.proxy for p in points]}
        if all(p.gold is not None for p in points):
            series["gold"] = [p.gold for p in points]
        grid = torch.linspace(0.0, max(d) * 1.05 if max(d) > 0 else 1.0, 200, dtype=torch.float64)
        for (name, values), colour in zip(series.items(), ("tab:blue", "tab:orange")):
            y = [v - values[0] for v in values] if relative else values
            label = {"proxy": "proxy (reward model)", "gold": "gold reward"}[name]
            ax.plot(d, y, "o", color=colour, label=label)
            for x, v, p in zip(d, y, points):
                ax.annotate(str(p.step), (x, v), textcoords="offset points", xytext=(3, 3), fontsize=7, color=colour)
            if name in fits:
                fit = fits[name]
                ax.plot(grid.tolist(), rl_curve(grid, fit.alpha, fit.beta).tolist(), "-", color=colour, alpha=0.7,
                        label=f"fit d(α − β log d): α={fit.alpha:.3g}, β={fit.beta:.3g}")
        if "gold" in series:
            top = max(range(len(points)), key=lambda i: (series["gold"][i], -points[i].step))
            ax.axvline(d[top], color="tab:orange", linestyle=":", alpha=0.6, label=f"peak gold: step {points[top].step}")
        ax.set_ylabel("reward − initial policy's" if relative else "reward")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no evaluation points", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("sqrt(KL to the reference)  (nats^½ per response)")
    ax.set_title(f"{stage}: reward against sqrt(KL), labels = step (Gao et al. 2022)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
