"""Is the distilled student better than the baseline by more than the noise?

Two kinds of noise: from seed to seed (mean ± sample std of each model's accuracy over seeds) and
from the particular val images (McNemar's paired test: on the same images, how often one model is
right where the other is wrong).
"""
from __future__ import annotations

import statistics

EXACT_BELOW = 25  # fewer discordant images than this: the exact binomial test, else chi-square
SIGNIFICANCE_LEVEL = 0.05


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (ddof=1; None for a single value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}


def discordant_counts(first_correct: list[bool], second_correct: list[bool]) -> tuple[int, int]:
    """(b, c): images only the first model gets right, and images only the second gets right."""
    pairs = list(zip(first_correct, second_correct, strict=True))
    return sum(1 for a, b in pairs if a and not b), sum(1 for a, b in pairs if b and not a)


def mcnemar(b: int, c: int) -> dict:
    """McNemar's test of b against c (two-sided): exact binomial for few discordant pairs,
    chi-square with continuity correction otherwise."""
    from scipy.stats import binomtest, chi2  # scipy comes with scikit-learn

    discordant = b + c
    if discordant < EXACT_BELOW:
        # Under no difference each discordant image is b's or c's with probability 1/2.
        p_value = binomtest(b, discordant, 0.5).pvalue if discordant else 1.0
        return {"b": b, "c": c, "test": "exact binomial", "statistic": b, "p_value": float(p_value)}
    statistic = (abs(b - c) - 1) ** 2 / discordant
    return {"b": b, "c": c, "test": "chi-square with continuity correction", "statistic": statistic,
            "p_value": float(chi2.sf(statistic, 1))}


def summarize_seeds(rows: dict[str, list[dict]], counts: list[tuple[int, int]]) -> dict:
    """Each model's accuracies over seeds, and, with a baseline, the student's paired gain over it.

    rows: model -> one row per seed (seed, best_val_acc, final_val_acc), in the same seed order;
    counts: the (b, c) of the student against the baseline per seed (empty without a baseline).
    """
    student = rows["student"]
    summary = {"seeds": [row["seed"] for row in student], "exported_seed": student[0]["seed"],
               **{name: {key: mean_std([row[key] for row in model_rows]) for key in ("best_val_acc", "final_val_acc")}
                  for name, model_rows in rows.items()}}
    if counts:
        gains = [s["best_val_acc"] - b["best_val_acc"] for s, b in zip(student, rows["baseline"], strict=True)]
        summary["gain_best_val_acc"] = mean_std(gains)
        summary["mcnemar"] = {
            "per_seed": [{"seed": row["seed"], **mcnemar(b, c)} for row, (b, c) in zip(student, counts, strict=True)],
            "pooled": mcnemar(sum(b for b, _ in counts), sum(c for _, c in counts))}
    return summary


def verdict(test: dict) -> str:
    """The McNemar result in words."""
    if test["p_value"] >= SIGNIFICANCE_LEVEL:
        return "not distinguishable from noise"
    if test["b"] > test["c"]:
        return "the gain is larger than the noise"
    return "the loss is larger than the noise: the student without a teacher is better"
