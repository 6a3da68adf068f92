"""File and class names reach a terminal, a log and a spreadsheet as text, never as commands."""
import csv

import torch

from kdistill.errors import printable
from kdistill.evaluate import write_predictions


def test_prediction_cells_that_a_spreadsheet_would_evaluate_are_quoted(tmp_path):
    path = tmp_path / "predictions.csv"
    names = ["=HYPERLINK(\"http://x\")", "+1.png", "-2.png", "@sum.png", "\tcmd.png", "plain.png"]
    classes = ["=cmd|' /C calc'!A0", "dog"]
    logits = torch.tensor([[1.0, 0.0]] * 5 + [[0.0, 1.0]])
    write_predictions(str(path), names, logits, classes)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["filename"] for row in rows] == ["'" + name for name in names[:5]] + ["plain.png"]
    assert rows[0]["label"] == "'=cmd|' /C calc'!A0" and rows[5]["label"] == "dog"


def test_escape_sequences_in_names_are_shown_not_obeyed():
    osc_link = "\x1b]8;;http://evil\x07click\x1b]8;;\x07"
    shown = printable(f"prepare: bad file {osc_link}.png\x9b2J\rover")
    assert "\x1b" not in shown and "\x07" not in shown and "\x9b" not in shown and "\r" not in shown
    assert "\\x1b]8;;http://evil\\x07click" in shown
    assert printable("two\nlines\tand a tab") == "two\nlines\tand a tab"  # layout characters are kept
