"""Which distillation methods differ beyond the noise: a finished `kdistill sweep --grid
distill.method=... --seeds ...` read back, each method's student over the seeds and every pair of
methods compared by McNemar's test on the val images, pooled over the seeds (seed k of one method
against seed k of the other: the same initial weights and batch order, only the method differs).

    python benchmarks/methods_pairwise.py /work/runs/methods3

Prints a table of the methods (mean ± std of the best val accuracy, best epochs) and the pairs, with
Holm's correction for the number of pairs, so "beyond the noise" holds for the table as a whole.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import statistics
from pathlib import Path

from kdistill.significance import discordant_counts, mcnemar

LEVEL = 0.05


def read_point(folder: Path) -> dict | None:
    """A finished point's per-seed accuracies and val correctness (None if it has not finished)."""
    if not (folder / "metrics.json").exists():
        return None
    metrics = json.loads((folder / "metrics.json").read_text())
    with open(folder / "val_predictions.csv") as f:
        rows = list(csv.DictReader(f))
    seeds = [row["seed"] for row in metrics["seeds"]["student"]]
    correct = {seed: [row[f"student-seed{seed}"] == row["label"] for row in rows] for seed in seeds}
    return {"rows": metrics["seeds"]["student"], "baseline": metrics["seeds"]["baseline"], "correct": correct,
            "seeds": seeds}


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the given order."""
    order = sorted(range(len(p_values)), key=p_values.__getitem__)
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path)
    args = parser.parse_args()
    points = {}
    for folder in sorted((args.sweep / "points").iterdir()):
        point = read_point(folder)
        if point is not None:
            points[folder.name.partition("=")[2]] = point
    first = next(iter(points.values()))
    baseline = [row["best_val_acc"] * 100 for row in first["baseline"]]
    print(f"baseline (no teacher): {statistics.mean(baseline):.2f} ± {statistics.stdev(baseline):.2f}%")
    print("| method | mean ± std | seeds | best epochs |\n|---|---|---|---|")
    for name, point in sorted(points.items(), key=lambda item: -statistics.mean(
            row["best_val_acc"] for row in item[1]["rows"])):
        accs = [row["best_val_acc"] * 100 for row in point["rows"]]
        print(f"| {name} | {statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}% | "
              f"{', '.join(f'{a:.2f}' for a in accs)} | {', '.join(str(r['best_epoch']) for r in point['rows'])} |")
    pairs = []
    for (a, pa), (b, pb) in itertools.combinations(points.items(), 2):
        counts = [discordant_counts(pa["correct"][seed], pb["correct"][seed]) for seed in pa["seeds"]]
        only_a, only_b = sum(c[0] for c in counts), sum(c[1] for c in counts)
        pairs.append((a, b, only_a, only_b, mcnemar(only_a, only_b)["p_value"]))
    adjusted = holm([pair[4] for pair in pairs])
    print(f"\n{len(pairs)} pairs, McNemar pooled over the seeds, Holm-adjusted at {LEVEL}:")
    print("| pair | only the first right | only the second right | p | Holm p | beyond the noise |")
    print("|---|---|---|---|---|---|")
    for (a, b, only_a, only_b, p), p_holm in sorted(zip(pairs, adjusted), key=lambda item: item[1]):
        print(f"| {a} vs {b} | {only_a} | {only_b} | {p:.2g} | {p_holm:.2g} | {'yes' if p_holm < LEVEL else 'no'} |")


if __name__ == "__main__":
    main()
