"""`kdistill predict` (bad files, batch size, the run's pixel limit, device), float TIFFs, and
architectures whose train-mode output is not one logits tensor.

Every test makes its own small files under tmp_path; nothing is downloaded.
"""
from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image
from torch import nn

from kdistill import cli, models
from kdistill.sources import torchvision_models
from kdistill.config import Config, build_config, save_config
from kdistill.errors import KdistillError
from kdistill.export import load_bundle, save_bundle
from kdistill.images import load_image
from kdistill.models import Standardized, build_model, check_train_output
from kdistill.predict import Reading, predict_folder
from kdistill.compute import resolve_device

SIZE = 16
CLASSES = ["cat", "dog"]
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]


# ---------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def bundle_file(tmp_path_factory):
    """A tiny untrained resnet18 student bundle, as a finished run saves it."""
    path = tmp_path_factory.mktemp("bundle") / "student.pt"
    torch.manual_seed(0)
    model, _ = build_model("resnet18", len(CLASSES))
    save_bundle(str(path), Standardized(model, MEAN, STD).eval(), "resnet18", 0.0, CLASSES, SIZE, "dataset")
    return path


def make_run(folder, bundle_file, max_image_pixels: int | None = None, with_config: bool = True) -> str:
    """A run folder: the student bundle and (unless with_config=False) the run's config.yaml."""
    folder.mkdir()
    (folder / "student.pt").write_bytes(bundle_file.read_bytes())
    if with_config:
        cfg = Config(image_size=SIZE)
        if max_image_pixels is not None:
            cfg.max_image_pixels = max_image_pixels
        save_config(cfg, str(folder / "config.yaml"))
    return str(folder)


def save_noise(path, width: int = 20, height: int = 20, seed: int = 0) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def read_rows(path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["filename", "label", "confidence"]
    return rows[1:]


def images_with_strays(folder):
    """Two good images, a stray notes.txt and a corrupt .jpg."""
    folder.mkdir()
    save_noise(folder / "a.png", seed=1)
    save_noise(folder / "b.png", seed=2)
    (folder / "notes.txt").write_text("shot on a rainy day\n")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


def test_predictions_match_the_student_run_by_hand(tmp_path, bundle_file):
    run = make_run(tmp_path / "run", bundle_file)
    images = tmp_path / "new"
    images.mkdir()
    for i in range(5):
        save_noise(images / f"img{i}.png", width=20 + 3 * i, height=24, seed=i)
    output = tmp_path / "out.csv"
    # batch_size 2 over 5 images: the last batch is partial
    assert predict_folder(run, str(images), str(output), Reading(batch_size=2, workers=1, log=lambda m: None),
                          device="cpu") == 5

    model, _ = load_bundle(str(bundle_file))
    stacked = torch.stack([torch.from_numpy(load_image(str(images / f"img{i}.png"), SIZE)) for i in range(5)])
    standardized = (stacked.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        probabilities = model.model(standardized).softmax(1)  # the network behind the bundle's standardization
    rows = read_rows(output)
    assert [row[0] for row in rows] == [f"img{i}.png" for i in range(5)]
    assert [row[1] for row in rows] == [CLASSES[i] for i in probabilities.argmax(1).tolist()]
    assert [float(row[2]) for row in rows] == pytest.approx(probabilities.max(1).values.tolist(), abs=1e-4)


@pytest.mark.parametrize("size", ["0", "-3"])
def test_cli_refuses_a_batch_size_below_one_in_one_line(tmp_path, bundle_file, capsys, size):
    run = make_run(tmp_path / "run", bundle_file)
    images = images_with_strays(tmp_path / "new")
    code = cli.main(["predict", "--run", run, "--images", str(images), "--batch-size", size])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdistill: error:") and "--batch-size" in lines[0], lines


def test_cli_skips_stray_files_with_one_warning_and_strict_refuses_the_first(tmp_path, bundle_file, capsys):
    run = make_run(tmp_path / "run", bundle_file)
    images = images_with_strays(tmp_path / "new")
    output = tmp_path / "out.csv"
    assert cli.main(["predict", "--run", run, "--images", str(images), "--output", str(output)]) == 0
    stdout = capsys.readouterr().out.strip().splitlines()
    warnings = [line for line in stdout if "skipped" in line]
    assert len(warnings) == 1 and "skipped 2 " in warnings[0], stdout
    assert str(images / "corrupt.jpg") in warnings[0] or str(images / "notes.txt") in warnings[0]
    assert [row[0] for row in read_rows(output)] == ["a.png", "b.png"]

    strict_output = tmp_path / "strict.csv"
    code = cli.main(["predict", "--run", run, "--images", str(images), "--output", str(strict_output), "--strict"])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdistill: error:"), lines
    assert str(images / "notes.txt") in lines[0]
    assert not strict_output.exists()


def test_strict_names_a_corrupt_image_found_while_decoding(tmp_path, bundle_file):
    run = make_run(tmp_path / "run", bundle_file)
    images = images_with_strays(tmp_path / "new")
    (images / "notes.txt").unlink()
    with pytest.raises(KdistillError) as caught:
        predict_folder(run, str(images), str(tmp_path / "out.csv"),
                       Reading(workers=1, strict=True, log=lambda m: None))
    assert str(images / "corrupt.jpg") in str(caught.value) and "\n" not in str(caught.value)


def test_cli_has_no_skip_bad_flag_for_predict(tmp_path, bundle_file, capsys):
    run = make_run(tmp_path / "run", bundle_file)
    with pytest.raises(SystemExit):
        cli.main(["predict", "--run", run, "--images", str(tmp_path), "--skip-bad"])
    assert "--skip-bad" in capsys.readouterr().err


def test_predict_uses_the_runs_own_pixel_limit(tmp_path, bundle_file):
    images = tmp_path / "new"
    images.mkdir()
    save_noise(images / "small.png", 20, 20)  # 400 pixels
    save_noise(images / "large.png", 30, 30)  # 900 pixels
    strict_run = make_run(tmp_path / "low", bundle_file, max_image_pixels=500)
    with open(os.path.join(strict_run, "config.yaml"), encoding="utf-8") as f:
        assert yaml.safe_load(f)["max_image_pixels"] == 500

    output, logged = tmp_path / "out.csv", []
    assert predict_folder(strict_run, str(images), str(output), Reading(workers=1, log=logged.append)) == 1
    assert [row[0] for row in read_rows(output)] == ["small.png"]
    assert len(logged) == 1 and str(images / "large.png") in logged[0] and "max_image_pixels=500" in logged[0]
    with pytest.raises(KdistillError) as caught:
        predict_folder(strict_run, str(images), str(output), Reading(workers=1, strict=True,
                                                                      log=lambda m: None))
    assert str(images / "large.png") in str(caught.value) and "max_image_pixels=500" in str(caught.value)

    # Without config.yaml, or without the key in it, the default limit applies.
    bare = make_run(tmp_path / "bare", bundle_file, with_config=False)
    strict = Reading(workers=1, strict=True, log=lambda m: None)
    assert predict_folder(bare, str(images), str(tmp_path / "bare.csv"), strict) == 2
    (tmp_path / "bare" / "config.yaml").write_text("image_size: 16\n")
    assert predict_folder(bare, str(images), str(tmp_path / "nokey.csv"), strict) == 2


def test_device_choice(monkeypatch, tmp_path, bundle_file, capsys):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(KdistillError, match="--device .*no CUDA device"):
        resolve_device("cuda:0", "--device")

    run = make_run(tmp_path / "run", bundle_file)
    for bad in ("gpu", "cuda:x", "cuda"):
        assert cli.main(["predict", "--run", run, "--images", str(tmp_path), "--device", bad]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "--device" in lines[0], lines


# ---------------------------------------------------------------- float TIFFs


def decode_float_tiff(tmp_path, values: np.ndarray) -> np.ndarray:
    path = tmp_path / "float.tif"
    Image.fromarray(values.astype(np.float32)).save(path)
    with Image.open(path) as check:
        assert check.mode == "F"  # really a 32-bit float file
    return load_image(str(path), SIZE)  # SIZE x SIZE in, so resizing leaves the pixels as they are


def gradient(low: float, high: float) -> np.ndarray:
    return np.linspace(low, high, SIZE * SIZE).reshape(SIZE, SIZE)


def assert_gray_close(decoded: np.ndarray, expected: np.ndarray) -> None:
    assert decoded.shape == (3, SIZE, SIZE)
    assert (decoded[0] == decoded[1]).all() and (decoded[1] == decoded[2]).all()
    difference = np.abs(decoded[0].astype(int) - expected.astype(int)).max()
    assert difference <= 1, f"max abs difference {difference}"


def test_float_tiff_in_unit_range_is_scaled_by_255_not_black(tmp_path):
    values = gradient(0.0, 1.0)
    decoded = decode_float_tiff(tmp_path, values)
    assert decoded.max() >= 254 and decoded.mean() > 100
    assert_gray_close(decoded, np.round(values * 255))


def test_float_tiff_in_another_range_is_min_max_scaled(tmp_path):
    values = gradient(0.0, 4000.0)
    assert_gray_close(decode_float_tiff(tmp_path, values), np.round(values / 4000 * 255))
    shifted = gradient(-2.0, 6.0)
    assert_gray_close(decode_float_tiff(tmp_path, shifted), np.round((shifted + 2) / 8 * 255))


def test_float_tiff_nan_and_inf_pixels_become_zero(tmp_path):
    values = gradient(0.0, 1.0)
    values[0, 0], values[5, 5], values[9, 3] = np.nan, np.inf, -np.inf
    expected = np.round(values * 255)
    expected[0, 0] = expected[5, 5] = expected[9, 3] = 0
    assert_gray_close(decode_float_tiff(tmp_path, values), expected)


# ---------------------------------------------------------------- architectures with aux logits


@pytest.mark.parametrize("arch, size", [("googlenet", 32), ("inception_v3", 80)])
def test_aux_logit_archs_train_on_plain_logits(arch, size):
    torch.manual_seed(0)
    model, head = build_model(arch, 3)
    assert head == "fc"
    model.train()
    images, labels = torch.randn(2, 3, size, size), torch.tensor([0, 2])
    logits = model(images)
    assert type(logits) is torch.Tensor and logits.shape == (2, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.fc.weight.detach().clone()
    loss = nn.functional.cross_entropy(logits, labels)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.fc.weight)


@pytest.mark.parametrize("arch", ["googlenet", "inception_v3"])
def test_imagenet_weights_with_aux_heads_load_into_the_plain_model(monkeypatch, arch):
    # torchvision's ImageNet weights carry the aux heads' tensors; stand in for the download.
    with_aux = torchvision.models.get_model(arch, weights=None, aux_logits=True, init_weights=False)
    aux_prefixes = torchvision_models.AUX_HEAD_ARCHS[arch]
    assert any(key.startswith(aux_prefixes) for key in with_aux.state_dict())
    monkeypatch.setattr(torchvision_models, "imagenet_state_dict", lambda name: with_aux.state_dict())
    model, _ = build_model(arch, 3, weights="imagenet")
    loaded = model.state_dict()
    assert not any(key.startswith(aux_prefixes) for key in loaded)
    for key, value in with_aux.state_dict().items():
        if not key.startswith(aux_prefixes + ("fc.",)):
            assert torch.equal(loaded[key], value), key


def test_googlenet_student_bundle_reloads_with_the_same_outputs(tmp_path):
    # The bundle is rebuilt with weights=none: the model must see its inputs exactly as in training.
    source = torchvision.models.get_model("googlenet", weights=None, aux_logits=True, init_weights=False)
    weights = tmp_path / "googlenet.pth"
    torch.save(source.state_dict(), weights)
    student, _ = build_model("googlenet", 2, weights=str(weights))
    student = Standardized(student, MEAN, STD).eval()
    save_bundle(str(tmp_path / "student.pt"), student, "googlenet", 0.0, CLASSES, 32, "dataset")
    reloaded, _ = load_bundle(str(tmp_path / "student.pt"))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(student(images), reloaded(images))


def test_inception_v3_needs_image_size_75():
    with pytest.raises(KdistillError) as caught:
        build_config(sets=["student.arch=inception_v3", "image_size=32"])
    message = str(caught.value)
    assert "image_size" in message and "inception_v3" in message and "\n" not in message
    assert build_config(sets=["student.arch=inception_v3", "image_size=75"]).image_size == 75


MODULE = '''
import torch
from torch import nn


class TupleNet(nn.Module):
    """Like googlenet in train mode: (logits, aux logits)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        logits = self.fc(self.features(x))
        return (logits, logits) if self.training else logits


class PlainNet(TupleNet):
    def forward(self, x):
        return self.fc(self.features(x))


class TinyOnlyNet(PlainNet):
    def forward(self, x):
        if x.shape[-1] > 8:
            raise RuntimeError("input too large\\nsecond line")
        return super().forward(x)


def tuple_net():
    return TupleNet()


def plain_net():
    return PlainNet()


def tiny_only_net():
    return TinyOnlyNet()
'''


def test_check_train_output_refuses_a_tuple_output_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "third_party_nets.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    check_train_output("third_party_nets:plain_net", SIZE, "student.arch")
    with pytest.raises(KdistillError) as caught:
        check_train_output("third_party_nets:tuple_net", SIZE, "student.arch")
    message = str(caught.value)
    assert "student.arch" in message and "tuple" in message and "\n" not in message
    with pytest.raises(KdistillError) as caught:
        check_train_output("third_party_nets:tiny_only_net", SIZE, "teacher.arch")
    message = str(caught.value)
    assert "teacher.arch" in message and "input too large" in message and "\n" not in message
