"""Class names are training folder names, so they can be anything a file system allows: a run must
draw and report them as they are, whatever matplotlib or an encoding would make of them."""
import base64
import html
import io
import os
from html.parser import HTMLParser

import pytest
from PIL import Image

import kdistill
from conftest import tiny_settings, write_digits_dataset


class Page(HTMLParser):
    """report.html's per-class table (rows of cell texts, unescaped) and its images' sources."""

    def __init__(self):
        super().__init__()
        self.rows, self.images, self._in_table = [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._in_table = attrs.get("id") == "per-class"
        elif tag == "tr" and self._in_table:
            self.rows.append([])
        elif tag in ("td", "th") and self._in_table:
            self.rows[-1].append("")
        elif tag == "img":
            self.images.append(attrs)

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_table = False

    def handle_data(self, data):
        if self._in_table and self.rows and self.rows[-1]:
            self.rows[-1][-1] += data


def _verify_png(data: bytes) -> None:
    Image.open(io.BytesIO(data)).verify()


@pytest.mark.parametrize("folder, shown", [
    (b"US$_and_$EUR", "US$_and_$EUR"),  # two `$`: matplotlib would read the text between them as mathtext
    # Latin-1, not UTF-8: Python names it with a lone surrogate, which no font can draw; shown as the
    # log shows it (errors.printable), the undecodable byte as a backslash escape.
    (b"caf\xe9", r"caf\xe9"),
], ids=["dollar-signs", "non-utf8"])
def test_a_run_plots_and_reports_an_unusual_class_name(folder, shown, tmp_path):
    data = write_digits_dataset(str(tmp_path / "data"), ["zero", "one"], {"train": 12, "val": 6}, test=0)
    for split in ("train", "val"):
        split_dir = os.fsencode(os.path.join(data, split))
        os.rename(os.path.join(split_dir, b"one"), os.path.join(split_dir, folder))
    out = str(tmp_path / "run")
    kdistill.run(tiny_settings(data, out, str(tmp_path / "cache"), baseline=False,
                               teacher={"arch": "tiny_nets:tiny_teacher", "epochs": 1},
                               student={"arch": "tiny_nets:tiny_student", "epochs": 1}), log=lambda message: None)

    with open(os.path.join(out, "report.html"), "rb") as f:
        text = f.read().decode("utf-8")  # strict
    page = Page()
    page.feed(text)
    assert sorted(row[0] for row in page.rows[1:]) == sorted(["zero", shown])
    assert f"<td>{html.escape(shown)}</td>" in text
    assert os.path.isfile(os.path.join(out, "report.md"))
    for plot in ("loss.png", "accuracy.png"):
        with open(os.path.join(out, plot), "rb") as f:
            _verify_png(f.read())
    inlined = {image["alt"]: image["src"] for image in page.images}
    for figure in ("confusion matrices", "reliability diagrams"):  # the confusion matrices label each class
        _verify_png(base64.b64decode(inlined[figure].removeprefix("data:image/png;base64,")))
