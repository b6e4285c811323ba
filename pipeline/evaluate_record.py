"""The evaluate stage's record, written as two files: metrics/evaluate.json (the headline DVC
lists as metrics) and metrics/evaluate_detail.json (everything). `merge` gives the whole record
back, `format_table` prints it and `verdict` reads an interval, for the stage and for what reads
its files (`restorl repro`'s summary, `restorl ablate`) without importing the stage, its torch
and diffusers."""

from __future__ import annotations


def merge(headline: dict, detail: dict) -> dict:
    """The whole evaluate record from its two files (the detail holds everything the headline
    does but `rl_vs_sft`, which it has in full as `vs_sft`)."""
    return {k: v for k, v in headline.items() if k != "rl_vs_sft"} | detail


def verdict(interval: dict[str, float], higher_is_better: bool) -> str:
    """better | worse | unclear: whether the interval clears zero, read in the metric's direction."""
    lo, hi = (interval["lo"], interval["hi"]) if higher_is_better else (-interval["hi"], -interval["lo"])
    return "better" if lo > 0 else "worse" if hi < 0 else "unclear"


def format_table(metrics: dict) -> str:
    """Plain-text table: one line per (task, row), one column per metric."""
    names = list(metrics["higher_is_better"])
    arrows = {m: "↑" if up else "↓" for m, up in metrics["higher_is_better"].items()}
    header = f"{'task':<16}{'n':>5}  {'output':<14}" + "".join(f"{m + arrows[m]:>10}" for m in names)
    lines = [header, "-" * len(header)]
    blocks = [("overall", {"n": metrics["n_test"], **metrics["overall"]})] + list(metrics.get("per_task", {}).items())
    for task, block in blocks:
        for row, scores in ((k, v) for k, v in block.items() if k != "n"):
            cells = "".join(f"{scores[m]:>10.3f}" if m in scores else f"{'':>10}" for m in names)
            lines.append(f"{task:<16}{block['n']:>5}  {row:<14}{cells}")
    if metrics.get("vs_sft"):
        lines += ["", "Against SFT on the same patches: mean difference [95 % bootstrap interval] and verdict"]
        for row, figures in metrics["vs_sft"].items():
            cells = [f"{m} {f['diff']:+.4g} [{f['lo']:+.4g}, {f['hi']:+.4g}] "
                     f"{verdict(f, metrics['higher_is_better'][m])}" for m, f in figures.items()]
            lines.append(f"  {row:<14}" + ";  ".join(cells))
    if metrics.get("gt_above_sft"):
        lines += ["", "Share of patches each no-reference judge scores GT better than SFT (under 0.5: its "
                  "RL-vs-SFT figure on that task is no evidence)"]
        for metric, rates in metrics["gt_above_sft"].items():
            low = ", ".join(f"{t} {r:.2f}" for t, r in rates.items() if t != "overall" and r < 0.5)
            lines.append(f"  {metric:<14}overall {rates['overall']:.2f}" + (f";  under 0.5: {low}" if low else ""))
    for name, block in metrics.get("benchmarks", {}).items():
        lines += ["", f"Benchmark '{name}' ({block['path']}):", format_table(block)]
    return "\n".join(lines)
