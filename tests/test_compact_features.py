"""Teacher features that would not fit in float16 are stored in 8 bits (distill.feature_storage),
so the teacher need not run online: each row within half a step of the teacher's value."""
import glob

import torch
from conftest import tiny_settings
from test_feature_cache import TINY, record_student_training, saved_teacher

import kdistill
from kdistill.features import FeatureTaps
from kdistill.teacher_signal import COMPACT_DTYPE, CompactRows, as_tensors, feature_megabytes, from_tensors

# The tiny teacher's layer2 (16, 8, 8) for 72 images x 2 flip views: 0.281 MB in float16, 0.141 MB
# in 8 bits with a float32 scale per row; this limit (0.205 MB) lies between.
BETWEEN = 0.0002


def test_compact_rows_serve_each_value_within_half_a_step_and_keep_a_broken_row_broken():
    torch.manual_seed(0)
    values = torch.randn(6, 3, 4, 5) * torch.tensor([1e-3, 1.0, 50.0, 0.0, 7.0, 1.0]).view(6, 1, 1, 1)
    values[5, 0, 0, 0] = float("nan")
    rows = CompactRows.of(values)
    assert rows.codes.dtype == COMPACT_DTYPE and rows.scales.shape == (6,) and rows.shape == values.shape
    served = rows.float()
    finite = slice(0, 5)
    steps = values[finite].flatten(1).abs().amax(1) / 127
    error = (served[finite] - values[finite]).flatten(1).abs().amax(1)
    assert torch.all(error <= steps / 2 + 1e-7)
    assert torch.equal(served[3], torch.zeros(3, 4, 5))  # an all-zero row is exact
    assert not torch.isfinite(served[5]).all()  # the teacher's NaN still shows
    # Indexed like the stored (N, K, ...) tensor: rows of samples, then each sample's view.
    stored = CompactRows.of(values[:4].flatten(1)).codes.view(2, 2, -1), CompactRows.of(values[:4]).scales.view(2, 2)
    by_view = CompactRows(*stored)
    picked = by_view[torch.tensor([1, 0])][torch.arange(2), torch.tensor([0, 1])]
    torch.testing.assert_close(picked.float(), torch.stack([by_view.float()[1, 0], by_view.float()[0, 1]]))
    assert len(by_view) == 2 and by_view.to(torch.device("cpu")).squeeze(1).shape == (2, 2, 60)
    tensors = as_tensors({"layer2": by_view, "layer3": values})
    assert set(tensors) == {"layer2", "layer2#scales", "layer3"}
    back = from_tensors(tensors)
    assert torch.equal(back["layer2"].float(), by_view.float()) and back["layer3"] is values
    assert feature_megabytes({"layer2": torch.Size([16, 8, 8])}, 144, COMPACT_DTYPE) == 144 * (1024 + 4) / 2**20


def run_between(digits_dataset, tmp_path, name: str, **distill):
    messages = []
    settings = tiny_settings(digits_dataset, str(tmp_path / name), str(tmp_path / "cache"), baseline=False,
                             augment="flip", **TINY, distill={"method": "fitnets", "max_signal_memory_gb": BETWEEN,
                                                              **distill})
    return kdistill.run(settings, log=messages.append), messages


def test_features_too_large_for_float16_are_stored_in_8_bits_and_served_within_half_a_step(digits_dataset, tmp_path,
                                                                                          monkeypatch):
    seen = record_student_training(monkeypatch)
    metrics, messages = run_between(digits_dataset, tmp_path, "run")
    assert metrics["teacher_signal"] == "views" and seen["teacher_forwards"] == 0  # stored, not online
    assert "teacher signal: features at layer2 (16, 8, 8) of 144 images and views take 0.3 MB in float16" in messages
    assert "teacher signal: features at layer2 (16, 8, 8) of 144 images and views take 0.1 MB in int8" in messages
    teacher = saved_teacher(str(tmp_path / "run"))
    taps = FeatureTaps(teacher, ["layer2"], "the teacher")
    for x, served in seen["batches"][1:]:  # after the probe that sizes the regressor
        with torch.no_grad():
            teacher(x)
        exact = taps.take()["layer2"]
        half_steps = exact.flatten(1).abs().amax(1) / 254
        assert served.features["layer2"].dtype == torch.float32
        assert torch.all((served.features["layer2"] - exact).flatten(1).abs().amax(1) <= half_steps + 1e-6)
    assert len(glob.glob(str(tmp_path / "cache" / "*" / "signal" / "teacher-features-*.pt"))) == 1
    again, messages = run_between(digits_dataset, tmp_path, "again")
    assert any(message.startswith("teacher features for 2 views per image: reusing") for message in messages)
    assert again["teacher_signal"] == "views"


def test_float16_storage_asked_for_and_too_large_runs_the_teacher_online(digits_dataset, tmp_path):
    metrics, messages = run_between(digits_dataset, tmp_path, "run", feature_storage="float16")
    assert metrics["teacher_signal"] == "online"
    assert not any("in int8" in message for message in messages)
