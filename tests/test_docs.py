"""The README is a front door whose commands run as written, and the docs site builds with every
link and anchor resolved (mkdocs build --strict)."""
import os
import re
import shlex
import subprocess
import sys

import pytest

from kdistill import cli
from kdistill.config import build_config

from conftest import ROOT

README = os.path.join(ROOT, "README.md")


def readme_commands() -> list[list[str]]:
    with open(README, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.startswith("    kdistill ")]
    return [shlex.split(line, comments=True)[1:] for line in lines]


def test_the_readme_is_a_front_door_and_links_to_pages_that_exist():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    assert len(text.splitlines()) <= 220
    linked = re.findall(r"\]\((docs/[^)#]+)", text)
    assert linked and all(os.path.isfile(os.path.join(ROOT, path)) for path in linked), linked


@pytest.mark.parametrize("args", readme_commands(), ids=lambda args: " ".join(args[:2]))
def test_every_kdistill_command_in_the_readme_parses_with_its_settings(args):
    parsed = cli.parser().parse_args(args)
    if getattr(parsed, "preset", None):
        build_config(parsed.preset, (), {}, parsed.sets)


def test_the_docs_site_builds_strictly(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "site" / "models" / "index.html").is_file()


def test_the_sites_home_page_is_the_readme():
    """docs/index.md is README.md with the links made relative to docs/ (regenerate it when the README changes)."""
    with open(README, encoding="utf-8") as f:
        readme = f.read()
    with open(os.path.join(ROOT, "docs", "index.md"), encoding="utf-8") as f:
        home = f.read()
    expected = re.sub(r"\]\(docs/([^)]+)\)", r"](\1)", readme).replace(
        "The docs site (`pip install mkdocs-material && mkdocs serve`, or read the files in `docs/`):",
        "The pages of this site:").replace("`benchmarks/RESULTS.md`", "`benchmarks/RESULTS.md` in the repository")
    assert home == expected
