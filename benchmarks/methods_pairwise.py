"""Which distillation methods differ beyond the noise: a finished `kdistill sweep --grid
distill.method=... --seeds ...` read back, each method's student over the seeds and every pair of
methods compared by McNemar's test on the val images, pooled over the seeds (seed k of one method
against seed k of the other: the same initial weights and batch order, only the method differs).

    python benchmarks/methods_pairwise.py /work/runs/methods3

Prints the methods and the baseline (the sweep's points share it) ranked by mean best val accuracy
(± std over the seeds, best epochs), each against the next below it and against the baseline, with
Holm's correction for the number of pairs, so "beyond the noise" holds for the table as a whole;
--all-pairs lists every pair.
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
    baseline_correct = {seed: [row[f"baseline-seed{seed}"] == row["label"] for row in rows] for seed in seeds}
    return {"rows": metrics["seeds"]["student"], "baseline": metrics["seeds"]["baseline"], "correct": correct,
            "baseline_correct": baseline_correct, "seeds": seeds}


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the given order."""
    order = sorted(range(len(p_values)), key=p_values.__getitem__)
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def read_sweep(sweep: Path) -> dict[str, dict]:
    """Every finished point by method, and the baseline (shared by the points) as one more."""
    points = {}
    for folder in sorted((sweep / "points").iterdir()):
        point = read_point(folder)
        if point is not None:
            points[folder.name.partition("=")[2]] = point
    if not points:
        raise SystemExit(f"{sweep}: no finished point yet")
    first = next(iter(points.values()))
    points["baseline"] = {"rows": first["baseline"], "correct": first["baseline_correct"], "seeds": first["seeds"]}
    return points


def compared(points: dict[str, dict]) -> dict[tuple[str, str], tuple[int, int, float, float]]:
    """Every pair of points: (only the first right, only the second right, p, Holm p), pooled over seeds."""
    pairs = {}
    for (a, pa), (b, pb) in itertools.combinations(points.items(), 2):
        counts = [discordant_counts(pa["correct"][seed], pb["correct"][seed]) for seed in pa["seeds"]]
        only_a, only_b = sum(c[0] for c in counts), sum(c[1] for c in counts)
        pairs[a, b] = (only_a, only_b, mcnemar(only_a, only_b)["p_value"])
    adjusted = holm([pair[2] for pair in pairs.values()])
    return {key: (*pair, p_holm) for (key, pair), p_holm in zip(pairs.items(), adjusted)}


def verdict(pairs: dict, a: str, b: str) -> str:
    """a against b: images only a gets right / only b does, and the Holm-adjusted p."""
    if (a, b) in pairs:
        only_a, only_b, _, p_holm = pairs[a, b]
    else:
        only_b, only_a, _, p_holm = pairs[b, a]
    return f"{only_a}/{only_b}, Holm p {p_holm:.2g}{' *' if p_holm < LEVEL else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--all-pairs", action="store_true", help="also list every pair")
    args = parser.parse_args()
    points = read_sweep(args.sweep)
    pairs = compared(points)
    ranked = sorted(points, key=lambda name: -statistics.mean(row["best_val_acc"] for row in points[name]["rows"]))
    print(f"{len(pairs)} pairs, McNemar pooled over the seeds, Holm-adjusted; * beyond the noise at {LEVEL}; "
          f"b/c: images only the method / only the other gets right")
    print("| method | mean ± std | seeds | best epochs | against the next below (b/c) | against the baseline (b/c) |")
    print("|---|---|---|---|---|---|")
    for rank, name in enumerate(ranked):
        rows = points[name]["rows"]
        accs = [row["best_val_acc"] * 100 for row in rows]
        below = verdict(pairs, name, ranked[rank + 1]) + f" ({ranked[rank + 1]})" if rank + 1 < len(ranked) else ""
        against = verdict(pairs, name, "baseline") if name != "baseline" else ""
        print(f"| {name} | {statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}% | "
              f"{', '.join(f'{a:.2f}' for a in accs)} | {', '.join(str(r['best_epoch']) for r in rows)} | "
              f"{below} | {against} |")
    if args.all_pairs:
        print("\n| pair | only the first right | only the second right | p | Holm p | beyond the noise |")
        print("|---|---|---|---|---|---|")
        for (a, b), (only_a, only_b, p, p_holm) in sorted(pairs.items(), key=lambda item: item[1][3]):
            print(f"| {a} vs {b} | {only_a} | {only_b} | {p:.2g} | {p_holm:.2g} | "
                  f"{'yes' if p_holm < LEVEL else 'no'} |")


if __name__ == "__main__":
    main()
