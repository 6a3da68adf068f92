"""Settings files are read within bounds (issue 25, item 8): YAML anchors and aliases (an alias bomb, a
recursive alias), nesting past any setting's depth and files over 1 MiB are refused in one short
line naming the file, by `kdistill config --config` and by `kdistill compare` reading a run's
config.yaml, without expanding anything."""
from __future__ import annotations

import json
import time
import tracemalloc

import pytest

import kdistill.compare  # noqa: F401  imported here, not under tracemalloc in main
from kdistill.cli import main

LEVELS = 7  # 9**7 = 4.8 million strings once expanded, from 400 bytes
# The anchors sit in a real setting's value, so that it is read before any unknown-setting check.
ALIAS_BOMB = "seed:\n" + "".join(
    f"  - &a{level} [{', '.join([f'*a{level - 1}' if level else 'lol'] * 9)}]\n" for level in range(LEVELS))
RECURSIVE_ALIAS = "distill: &loop\n  temperature: 4.0\n  inner: *loop\n"
TOO_DEEP = "seeds: " + "[" * 5000 + "]" * 5000 + "\n"
OVERSIZED = "# padding\n" * 120_000 + "seed: 1\n"  # 1.2 MB, otherwise a valid settings file

FILES = {"alias bomb": ALIAS_BOMB, "recursive alias": RECURSIVE_ALIAS, "too deep": TOO_DEEP,
         "oversized": OVERSIZED}


def one_short_line(capsys, path) -> str:
    """The one stderr line, checked to be short and to name the file."""
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, [line[:200] for line in lines[:5]]
    assert len(lines[0]) < 500 and lines[0].startswith("kdistill: error: "), lines[0][:600]
    assert str(path) in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("name", FILES)
def test_config_refuses_the_file_in_one_short_line(tmp_path, capsys, name):
    path = tmp_path / "settings.yaml"
    path.write_text(FILES[name])
    assert main(["config", "--config", str(path)]) == 2
    line = one_short_line(capsys, path)
    assert ("anchor" in line) if "alias" in name else ("deep" in line if name == "too deep" else "MiB" in line)


def finished_looking_run(folder, config_text: str) -> str:
    """A run folder as compare reads it: a metrics.json with a models table, and config.yaml."""
    folder.mkdir()
    (folder / "config.yaml").write_text(config_text)
    model = {"arch": "resnet18", "best_val_acc": 0.5, "best_epoch": 1, "params": 1_000_000}
    (folder / "metrics.json").write_text(json.dumps({"device": "cpu", "models": {"student": model}}))
    return str(folder)


@pytest.mark.parametrize("name", FILES)
def test_compare_refuses_the_runs_config_quickly_and_in_little_memory(tmp_path, capsys, name):
    plain = finished_looking_run(tmp_path / "plain", "seed: 1\n")
    bad = finished_looking_run(tmp_path / "bad", FILES[name])
    started = time.monotonic()
    tracemalloc.start()
    try:
        code = main(["compare", plain, bad])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 2
    one_short_line(capsys, tmp_path / "bad" / "config.yaml")
    assert peak < 20 * 2**20, f"compare used {peak / 2**20:.0f} MiB"
    assert time.monotonic() - started < 10


def test_a_plain_settings_file_is_still_read(tmp_path, capsys):
    path = tmp_path / "settings.yaml"
    path.write_text("seed: 3\ndistill:\n  temperature: 2.5\n")
    assert main(["config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "seed: 3" in out and "temperature: 2.5" in out


def test_a_long_bad_value_is_quoted_as_a_short_excerpt(tmp_path, capsys):
    path = tmp_path / "settings.yaml"
    path.write_text(f"seed: [{', '.join(['12345'] * 5_000)}]\n")
    assert main(["config", "--config", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and len(lines[0]) < 300 and "setting seed must be a whole number" in lines[0], lines


def test_every_invalid_setting_is_reported_at_once_with_a_close_match_for_a_typo():
    """Declared bounds (setting(..., ge=0)) and the cross-checks all report, in one line."""
    from kdistill.config import build_config
    from kdistill.errors import KdistillError

    with pytest.raises(KdistillError) as error:
        build_config(sets=["student.lr=-1", "teacher.dropout=2", "distill.alpha=3", "distill.dkd.nckd_weight=-1"])
    message = str(error.value)
    assert "\n" not in message
    for named in ("setting student.lr must be > 0", "setting teacher.dropout must be in [0, 1)",
                  "setting distill.alpha must be in [0, 1]"):
        assert named in message
    assert "and 1 more" in message  # the fourth, distill.dkd.nckd_weight, is counted
    with pytest.raises(KdistillError, match=r"unknown setting 'student.epoch' \(did you mean student.epochs\?\)"):
        build_config(sets=["student.epoch=3"])
