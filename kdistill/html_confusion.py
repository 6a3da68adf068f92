"""report.html's confusion matrices, row-normalized: each true class's row as shares of that class's
val images, so that classes of different sizes compare (the diagonal is each class's recall); the
counts stay visible beside the shares (in the figure, and under each share and in its tooltip in the
tables)."""
from __future__ import annotations

import html

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .errors import printable  # noqa: E402
from .report import LABELS, plot_label  # noqa: E402

ANNOTATED_UP_TO = 15  # classes: beyond this a confusion figure shows colours only, no numbers
TABLE_UP_TO = 30  # classes: beyond this there is no confusion table, only the figure
SHADE = "31, 119, 180"  # matplotlib's tab:blue, the tables' cell colour at a share of 1


def confusion(labels: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """(classes, classes) counts: row = true class, column = predicted class."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(labels, predicted, labels=list(range(classes)))


def row_shares(matrix: np.ndarray) -> np.ndarray:
    """Each row as shares of its sum (a class without images: a row of zeros)."""
    return matrix / np.maximum(matrix.sum(1, keepdims=True), 1)


def share_text(count: int, total: int) -> str:
    """count of total as a whole percentage that never rounds a miss to 0% or 100%."""
    if total == 0:
        return "–"
    if count == 0:
        return "0"
    text = f"{count / total:.0%}"
    return "<1%" if text == "0%" else ">99%" if text == "100%" and count < total else text


def confusion_figure(matrices: dict[str, np.ndarray], classes: list[str]):
    """One panel per model's confusion matrix, coloured by row share (0 to 1 in every panel); up to
    ANNOTATED_UP_TO classes each non-empty cell shows its share over its count."""
    count = len(classes)
    side = min(max(3.2, 0.36 * count + 1.5), 9)
    figure, axes = plt.subplots(1, len(matrices), figsize=(side * len(matrices), side), squeeze=False)
    for axis, (kind, matrix) in zip(axes[0], matrices.items()):
        shares = row_shares(matrix)
        axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        accuracy = matrix.trace() / max(matrix.sum(), 1)
        axis.set_title(f"{LABELS.get(kind, kind)} ({accuracy:.1%}): share of each true class", fontsize=9)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        if count <= 30:
            names = [plot_label(name) for name in classes]
            axis.set_xticks(range(count), names, rotation=90, fontsize=7)
            axis.set_yticks(range(count), names, fontsize=7)
        if count <= ANNOTATED_UP_TO:
            for (row, column), value in np.ndenumerate(matrix):
                if value:
                    axis.text(column, row, f"{share_text(value, matrix[row].sum())}\n{value}", ha="center",
                              va="center", fontsize=6, linespacing=1.0,
                              color="white" if shares[row, column] > 0.5 else "black")
    figure.tight_layout()
    return figure


def _name(value) -> str:
    return html.escape(printable(str(value)))


def _cell(count: int, total: int, true_name, predicted_name, diagonal: bool) -> str:
    """One table cell: the share, its count under it (none under a 0) and in its tooltip, shaded by the share."""
    share = count / max(total, 1)
    style = (f" style='background: rgba({SHADE}, {0.9 * share:.2f}){'; color: #fff' if share > 0.5 else ''}'"
             if count else "")
    title = f"{count} of the {total} val images of {_name(true_name)} predicted {_name(predicted_name)}"
    shown = html.escape(share_text(count, total)) + (f"<small>{count}</small>" if count else "")
    return f"<td{' class=hit' if diagonal else ''} title='{title}'{style}>{shown}</td>"


def confusion_table(matrix: np.ndarray, classes: list[str], kind: str) -> str:
    """A model's confusion matrix as a table: each cell its share of its row's true class, its count,
    the diagonal (each class's recall) bold."""
    totals = matrix.sum(1)
    head = "".join(f"<th title='predicted {_name(name)}'>{_name(name)}</th>" for name in classes)
    rows = "".join(
        f"<tr><th>{_name(true_name)}</th><td>{int(totals[row])}</td>"
        + "".join(_cell(int(matrix[row, column]), int(totals[row]), true_name, predicted_name, row == column)
                  for column, predicted_name in enumerate(classes)) + "</tr>"
        for row, true_name in enumerate(classes))
    return (f"<div class='wide'><table class='confusion' id='confusion-{html.escape(kind)}'><tr>"
            f"<th>true \\ predicted</th><th>Val images</th>{head}</tr>{rows}</table></div>")


def confusion_section(labels: np.ndarray, predicted: dict[str, np.ndarray], classes: list[str], img) -> str:
    """The section's note, figure and (up to TABLE_UP_TO classes) one table per model, the distilled
    student's open; img(figure, alt) inlines a matplotlib figure."""
    matrices = {kind: confusion(labels, answer, len(classes)) for kind, answer in predicted.items()}
    parts = ["<p class='note'>Each row is one true class, as shares of that class's val images, so that classes of "
             "different sizes compare: the diagonal is each class's accuracy (recall). The small number under each "
             "share is its count of images.</p>", img(confusion_figure(matrices, classes), "confusion matrices")]
    if len(classes) <= TABLE_UP_TO:
        for kind, matrix in sorted(matrices.items(), key=lambda item: item[0] != "student"):
            table = confusion_table(matrix, classes, kind)
            parts.append(f"<details{' open' if kind == 'student' else ''}><summary>"
                         f"{html.escape(LABELS.get(kind, kind))}: shares of each true class</summary>{table}</details>")
    return "\n".join(parts)
