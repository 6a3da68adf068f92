import base64
import csv
import io
import os
import re
import shutil
import subprocess
from types import SimpleNamespace
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

import kdistill
from conftest import tiny_settings
from kdistill.html_confusion import TABLE_UP_TO, confusion, share_text
from kdistill.html_report import MISTAKES_SHOWN, agreement, expected_calibration_error, page

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
WINDOW = (1280, 2000)


def test_expected_calibration_error_matches_a_hand_computed_value():
    probabilities = np.array([[0.9, 0.1], [0.08, 0.92], [0.3, 0.7], [0.62, 0.38]])
    labels = np.array([0, 0, 1, 1])
    # Bins of width 1/15: 0.9 and 0.92 share (13/15, 14/15] (accuracy 1/2, confidence 0.91), 0.7 is
    # alone in (10/15, 11/15] (right), 0.62 alone in (9/15, 10/15] (wrong).
    by_hand = 2 / 4 * abs(0.5 - 0.91) + 1 / 4 * abs(1 - 0.7) + 1 / 4 * abs(0 - 0.62)
    assert expected_calibration_error(probabilities, labels) == pytest.approx(by_hand)  # 0.435
    # Always right at full confidence: perfectly calibrated (1.0 falls in the last bin, not past it).
    assert expected_calibration_error(np.eye(3), np.arange(3)) == pytest.approx(0.0)


def test_agreement_counts_match_hand_counts():
    labels = np.array([0, 0, 1, 1, 2, 2])
    teacher = np.array([0, 0, 1, 0, 2, 1])
    student = np.array([0, 0, 1, 1, 0, 1])
    result = agreement(labels, teacher, student, classes=4)
    assert result["overall"] == pytest.approx(4 / 6)
    assert result["per_class"] == [1.0, 0.5, 0.5, None]  # class 3 has no val images
    assert (result["both_right"], result["student_right_teacher_wrong"], result["teacher_right_student_wrong"],
            result["both_wrong"]) == (3, 1, 1, 1)


def _made_up_run() -> tuple[dict, dict]:
    """metrics.json and config.yaml content of a run with seeds and a deployment section."""
    model = {"arch": "resnet18", "seed": 0, "best_val_acc": 0.5, "best_epoch": 2, "final_val_acc": 0.5,
             "params": 1e6, "gflops": 0.1, "latency_ms": 1.0, "size_mb": 4.0, "train_seconds": 3.0}
    spread = {"best_val_acc": {"mean": 0.6, "std": 0.05}, "final_val_acc": {"mean": 0.55, "std": 0.1}}
    metrics = {"models": {"teacher": model, "student": model, "baseline": model}, "images": {"train": 8, "val": 4},
               "device": "cpu", "precision": "fp32", "stage_seconds": {"teacher": 1.5},
               "summary": {"seeds": [0, 1], "student": spread, "baseline": spread},
               "deployment": {"onnx int8": {"latency_ms": 0.25, "size_mb": 1.5}, "torchscript": {"latency_ms": 2}}}
    config = {"data": "D", "image_size": 8, "distill": {"method": "kd", "temperature": 4, "alpha": 0.7}}
    return metrics, config


def test_page_shows_seed_spreads_deployment_rows_and_escapes_names():
    """Without training: a page from made-up numbers of a run with seeds and a deployment section."""
    metrics, config = _made_up_run()
    val = SimpleNamespace(images=torch.zeros(4, 3, 8, 8, dtype=torch.uint8), labels=torch.tensor([0, 1, 0, 1]),
                          files=["a.png", "b.png", "c.png", "d.png"])
    probabilities = {"teacher": np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]),
                     "student": np.array([[0.7, 0.3], [0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]),
                     "baseline": np.array([[0.5, 0.5], [0.4, 0.6], [0.6, 0.4], [0.3, 0.7]])}
    parts = PageParts()
    parts.feed(page(metrics, config, val, ["<b>cat</b>", "dog"], probabilities, [b"", b""]))
    rows = {row[0]: row for row in parts.tables["comparison"][1:]}
    assert rows["Distilled student (seed 0)"][4:6] == ["60.00% ± 5.00%", "55.00% ± 10.00%"]
    assert rows["Teacher"][4] == "trained once"
    deployment = [table for table in parts.tables.values() if table[0][1:] == ["latency_ms", "size_mb"]]
    assert deployment == [[["", "latency_ms", "size_mb"], ["onnx int8", "0.25", "1.5"], ["torchscript", "2", ""]]]
    assert "<b>cat</b>" in [row[0] for row in parts.tables["per-class"][1:]]  # a class name is text, not markup
    assert len(parts.images) == 4 + 1  # one mistake: b.png, the student sure at 90%


class PageParts(HTMLParser):
    """The tables (by id: rows of cell texts), the <img> sources and any script or stylesheet link."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.external = {}, [], []
        self._table = self._row = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id", f"table{len(self.tables)}"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._row.append("")
        elif tag == "img":
            self.images.append(attrs)
        elif tag in ("script", "link", "iframe"):
            self.external.append(tag)

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = self._row = None

    def handle_data(self, data):
        if self._row:
            self._row[-1] += data


@pytest.fixture(scope="module")
def finished_run(digits_dataset, tmp_path_factory):
    base = tmp_path_factory.mktemp("html")
    out = str(base / "run")
    metrics = kdistill.run(tiny_settings(digits_dataset, out, str(base / "cache"), teacher={"epochs": 1},
                                         student={"epochs": 1}))
    return out, metrics


def test_report_html_holds_the_comparison_and_every_figure(finished_run):
    out, metrics = finished_run
    text = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    parts = PageParts()
    parts.feed(text)
    assert "<h2>Deployment</h2>" not in text  # metrics.json has no deployment numbers
    rows = {row[0]: row for row in parts.tables["comparison"][1:]}
    assert list(rows) == ["Teacher", "Distilled student", "Student without teacher"]
    for kind, label in (("teacher", "Teacher"), ("student", "Distilled student"),
                        ("baseline", "Student without teacher")):
        model = metrics["models"][kind]
        assert rows[label][2] == f"{model['best_val_acc']:.2%} ({model['best_epoch']})"
    rows = parts.tables["per-class"][1:]
    assert sorted(row[0] for row in rows) == ["one", "two", "zero"]
    f1 = [float(row[-2]) for row in rows]
    assert f1 == sorted(f1)  # the student's weakest class first
    with open(os.path.join(out, "val_predictions.csv")) as f:
        val = list(csv.DictReader(f))
    mistakes = sum(row["student"] != row["label"] for row in val)
    # The two curves, the confusion matrices, the reliability diagrams, one thumbnail per mistake shown.
    assert len(parts.images) == 4 + min(MISTAKES_SHOWN, mistakes)
    assert not parts.external
    for image in parts.images:
        prefix = "data:image/png;base64,"
        assert image["src"].startswith(prefix)
        Image.open(io.BytesIO(base64.b64decode(image["src"][len(prefix):]))).verify()
    # Agreement with the teacher: the 2x2 table's counts cover every val image.
    counts = [int(cell) for row in parts.tables["agreement"][1:] for cell in row[1:]]
    assert sum(counts) == len(val)
    assert "report.html written in" in open(os.path.join(out, "log.txt")).read()


def _browser() -> str:
    browser = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if browser is None:
        pytest.fail("no Chromium found (looked for chromium, chromium-browser, google-chrome): install Debian's "
                    "chromium (apt-get install -y chromium)", pytrace=False)
    return browser


def test_report_html_renders_in_a_headless_browser(finished_run, tmp_path):
    out, _ = finished_run
    browser = _browser()
    screenshot = tmp_path / "page.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={screenshot}",
                    f"--window-size={WINDOW[0]},{WINDOW[1]}", "file://" + os.path.join(out, "report.html")],
                   check=True, capture_output=True, timeout=180)
    with Image.open(screenshot) as image:
        assert image.format == "PNG" and image.size == WINDOW
        pixels = np.asarray(image.convert("RGB")).astype(int)
    non_white = (pixels.min(2) < 235).mean()
    # Text alone is grey: strongly coloured pixels come from the rendered figures (curves, matrices).
    coloured = (pixels.max(2) - pixels.min(2) > 80).mean()
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200
    assert non_white > 0.03 and coloured > 0.01, (non_white, coloured)


class ConfusionTables(HTMLParser):
    """Each confusion table (by id): its predicted-class header and rows of (true class, images,
    cells), a cell being (share text, count, tooltip); and the ids of those in an open <details>."""

    def __init__(self):
        super().__init__()
        self.tables, self.open, self._details_open = {}, set(), False
        self._table = self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "details":
            self._details_open = "open" in attrs
        elif tag == "table" and "confusion" in (attrs.get("class") or ""):
            self._table = self.tables.setdefault(attrs["id"], {"header": [], "rows": []})
            if self._details_open:
                self.open.add(attrs["id"])
        elif self._table is not None and tag == "tr":
            self._table["rows"].append([])
        elif self._table is not None and tag in ("td", "th"):
            self._cell = {"text": "", "small": "", "title": attrs.get("title", "")}
            self._table["rows"][-1].append(self._cell)
        elif self._cell is not None and tag == "small":
            self._cell["in_small"] = True

    def handle_endtag(self, tag):
        if tag == "table" and self._table is not None:
            self._table["header"] = [cell["text"] for cell in self._table["rows"].pop(0)[2:]]
            self._table = self._cell = None
        elif tag == "small" and self._cell is not None:
            self._cell["in_small"] = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["small" if self._cell.get("in_small") else "text"] += data


def test_shares_never_round_a_miss_away_and_rows_are_true_classes():
    assert [share_text(count, total) for count, total in ((0, 0), (0, 5), (1, 3), (3, 3), (1, 300), (299, 300))] == [
        "–", "0", "33%", "100%", "<1%", ">99%"]
    assert confusion(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 0]), 3).tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


def test_report_html_confusion_tables_are_shares_of_each_true_class(finished_run):
    """Each cell of a model's table: the share of its row's true class predicted as its column, the
    count under it and in its tooltip, all as val_predictions.csv has them; the student's open."""
    out, _ = finished_run
    tables = ConfusionTables()
    with open(os.path.join(out, "report.html"), encoding="utf-8") as f:
        tables.feed(f.read())
    assert set(tables.tables) == {"confusion-teacher", "confusion-student", "confusion-baseline"}
    assert tables.open == {"confusion-student"}
    with open(os.path.join(out, "val_predictions.csv")) as f:
        val = list(csv.DictReader(f))
    for kind in ("student", "baseline"):  # the two with their predictions in val_predictions.csv
        table = tables.tables[f"confusion-{kind}"]
        assert sorted(table["header"]) == ["one", "two", "zero"]
        for true_class, images, *cells in table["rows"]:
            truth = [row[kind] for row in val if row["label"] == true_class["text"]]
            assert int(images["text"]) == len(truth) == 8
            for predicted, cell in zip(table["header"], cells):
                count = truth.count(predicted)
                assert (cell["text"], int(cell["small"] or 0)) == (share_text(count, len(truth)), count)
                if cell["text"].endswith("%") and cell["text"][0].isdigit():  # the row's share, in whole percents
                    assert float(cell["text"][:-1]) / 100 == pytest.approx(count / len(truth), abs=0.0051)
                assert cell["title"] == (f"{count} of the {len(truth)} val images of {true_class['text']} "
                                         f"predicted {predicted}")


MEASURE = ("<script>addEventListener('load', () => document.body.setAttribute('data-widths', "
           "[document.documentElement.scrollWidth, document.documentElement.clientWidth, innerWidth].join()))"
           "</script>")


def _layout_widths(browser: str, text: str, folder) -> tuple[int, int, int]:
    """(the page's scrollWidth, the width it is shown in, the window's width) as Chromium lays out a copy
    of the page, with a script added to measure (report.html has none), in a window WINDOW wide."""
    copy = folder / "measured.html"
    copy.write_text(text.replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    result = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                             f"--user-data-dir={folder / 'profile'}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                             copy.as_uri()],
                            check=True, capture_output=True, text=True, timeout=180)
    found = re.search(r'data-widths="(\d+),(\d+),(\d+)"', result.stdout)
    assert found, result.stdout[-2000:]
    return int(found[1]), int(found[2]), int(found[3])


def test_report_html_fits_a_1280_px_window(finished_run, tmp_path):
    """No horizontal scrolling at 1280 px: the page is never wider than its window (measured the same
    way, a page with a 1500 px wide block is)."""
    out, _ = finished_run
    browser = _browser()
    with open(os.path.join(out, "report.html"), encoding="utf-8") as f:
        text = f.read()
    scroll, shown, window = _layout_widths(browser, text, tmp_path)
    assert window == WINDOW[0] and scroll <= shown <= WINDOW[0], (scroll, shown, window)
    wider = text.replace("</body>", "<div style='width: 1500px'>wide</div></body>")
    assert _layout_widths(browser, wider, tmp_path)[0] > WINDOW[0]


def test_a_crowded_page_fits_a_1280_px_window(tmp_path):
    """Without training: 15 classes with long names, long file names and data path, seeds and a
    deployment table; wide tables scroll in their own box, the page does not scroll."""
    metrics, config = _made_up_run()
    config["data"] = "/data/" + "a_folder_name_without_spaces_" * 8
    classes = [f"class_{c:02d}_with_a_long_name_and_no_spaces" for c in range(TABLE_UP_TO // 2)]
    labels = np.arange(60) % len(classes)
    val = SimpleNamespace(images=torch.zeros(60, 3, 8, 8, dtype=torch.uint8), labels=torch.tensor(labels),
                          files=[f"photos/{'a_long_file_name_' * 6}{index}.png" for index in range(60)])
    rng = np.random.default_rng(0)
    probabilities = {kind: rng.dirichlet(np.ones(len(classes)), 60) for kind in ("teacher", "student", "baseline")}
    buffer = io.BytesIO()
    Image.new("RGB", (630, 378), "steelblue").save(buffer, format="PNG")  # as large as a run's curves
    text = page(metrics, config, val, classes, probabilities, [buffer.getvalue()] * 2)
    scroll, shown, window = _layout_widths(_browser(), text, tmp_path)
    assert window == WINDOW[0] and scroll <= shown <= WINDOW[0], (scroll, shown, window)
