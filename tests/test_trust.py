"""Results a user can trust: each model's own input statistics, a baseline that differs from the
student only by the teacher, resumes only where the numbers repeat, caches checked rather than
assumed, an ONNX file that matches, bundles that run no foreign code, cheap checks first."""
import glob
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

import kdistill
from conftest import tiny_settings
from kdistill import out_folder, pipeline
from kdistill.cli import main
from kdistill.config import TrainConfig
from kdistill.data import prepare, scan_dataset
from kdistill.data_key import cache_key, dated_key
from kdistill.distillers import CrossEntropy
from kdistill.errors import KdistillError
from kdistill.export import ONNX_TOLERANCE, export_onnx, load_bundle, save_bundle
from kdistill.fileio import load_torch, save_torch
from kdistill.models import IMAGENET_STATS, Standardized, build_model, standardized_model
from kdistill.batches import Batches
from kdistill.train import fit
from kdistill.callbacks import Session

CPU = torch.device("cpu")
quiet = lambda message: None  # noqa: E731


# ---------------------------------------------------------------- 1. each model's input statistics


def test_pretrained_models_get_imagenet_statistics_and_models_from_scratch_the_training_sets(tmp_path):
    dataset_mean, dataset_std = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]
    weights = tmp_path / "pretrained.pth"
    torch.save(build_model("resnet18", 1000)[0].state_dict(), weights)
    cases = [("none", "auto", "dataset"), (str(weights), "auto", "imagenet"),
             (str(weights), "dataset", "dataset"), ("none", "imagenet", "imagenet")]
    for weights_setting, normalize, expected in cases:
        model, head, name = standardized_model("resnet18", 3, 0.0, weights_setting, normalize,
                                               dataset_mean, dataset_std)
        mean, std = (IMAGENET_STATS if expected == "imagenet" else (dataset_mean, dataset_std))
        assert name == expected and head == "model.fc"
        assert model.mean.flatten().tolist() == pytest.approx(mean)
        assert model.std.flatten().tolist() == pytest.approx(std)
        images = torch.rand(2, 3, 16, 16)
        with torch.no_grad():  # the model standardizes [0, 1] images with those statistics itself
            expected_logits = model.model.eval()((images - torch.tensor(mean).view(1, 3, 1, 1))
                                                 / torch.tensor(std).view(1, 3, 1, 1))
            torch.testing.assert_close(model.eval()(images), expected_logits)
    # A module:callable model declares what its pretrained weights expect.
    zoo, _, name = standardized_model("kdistill.zoo:efficientnet_lite0", 3, 0.0, "none", "auto",
                                      dataset_mean, dataset_std)
    assert name == "imagenet" and zoo.mean.flatten().tolist() == pytest.approx(IMAGENET_STATS[0])


def test_a_run_gives_teacher_and_student_their_own_statistics(digits_dataset, tmp_path):
    settings = tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache"), baseline=False,
                             teacher={"mode": "head", "normalize": "imagenet", "epochs": 1}, student={"epochs": 1})
    metrics = kdistill.run(settings, log=quiet)
    assert metrics["models"]["teacher"]["input_standardization"] == "imagenet"
    assert metrics["models"]["student"]["input_standardization"] == "dataset"
    teacher = load_torch(str(tmp_path / "run" / "models" / "teacher.pt"))
    assert teacher["mean"].flatten().tolist() == pytest.approx(IMAGENET_STATS[0])
    data = prepare(digits_dataset, 16, str(tmp_path / "cache"), workers=1, log=quiet)
    student, bundle = load_bundle(str(tmp_path / "run" / "student.pt"))
    assert student.mean.flatten().tolist() == pytest.approx(data.mean) and bundle["normalize"] == "dataset"
    # The teacher's cached features depend on its statistics: another choice is another cache entry.
    settings = dict(settings, out=str(tmp_path / "run2"), teacher=dict(settings["teacher"], normalize="dataset"))
    kdistill.run(settings, log=quiet)
    assert len(glob.glob(str(tmp_path / "cache" / "*" / "signal" / "features-*.pt"))) == 2


# ---------------------------------------------------------------- 2. the baseline differs only by the teacher


def record_training_inputs(monkeypatch) -> dict[str, list[torch.Tensor]]:
    """Every training batch fit() takes from its Batches, per model name."""
    seen: dict[str, list[torch.Tensor]] = {}
    real_fit = pipeline.fit

    def recording_fit(name, model, trainable, train, *args, **kwargs):
        real_iterate = train.iterate

        def iterate(*iterate_args, **iterate_kwargs):
            for batch in real_iterate(*iterate_args, **iterate_kwargs):
                seen.setdefault(name, []).append(
                    torch.cat([batch.x.flatten(1), batch.labels.view(-1, 1).float()], 1).clone())
                yield batch
        train.iterate = iterate
        return real_fit(name, model, trainable, train, *args, **kwargs)
    monkeypatch.setattr(pipeline, "fit", recording_fit)
    return seen


@pytest.mark.parametrize("signal", ["views", "online"])
def test_student_and_baseline_see_identical_inputs_batch_by_batch(digits_dataset, tmp_path, monkeypatch, signal):
    seen = record_training_inputs(monkeypatch)
    settings = tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache"), augment="crop_flip",
                             teacher={"epochs": 1}, student={"epochs": 3, "dropout": 0.5},
                             distill={"teacher_signal": signal, "views": 4})
    kdistill.run(settings, log=quiet)
    student, baseline = seen["student"], seen["baseline"]
    assert len(student) == len(baseline) == 3 * 5  # 72 images in batches of 16, 3 epochs
    for batch, (a, b) in enumerate(zip(student, baseline)):
        assert torch.equal(a, b), f"batch {batch} differs"
    # Augmentation is on: the same image comes in other views and orders from epoch to epoch.
    assert not torch.equal(torch.cat(student[:5]), torch.cat(student[5:10]))


# ---------------------------------------------------------------- 3. resume only where the numbers repeat


def test_a_resume_in_another_precision_is_refused(tmp_path):
    images, labels = torch.rand(20, 3, 8, 8), torch.arange(20) % 2
    batches = Batches(images, labels, lambda x: x)

    def train(epochs, precision):
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 2))
        return fit("student", model, model, batches, batches, CrossEntropy(), TrainConfig(epochs=epochs, batch_size=10),
                   Session(str(tmp_path), CPU, seed=0, log=quiet, precision=precision))
    train(1, "fp32")
    with pytest.raises(KdistillError) as error:
        train(2, "bf16")
    message = str(error.value)
    assert "cpu in fp32" in message and "cpu in bf16" in message and "\n" not in message
    assert len(train(2, "fp32")) == 2  # the same precision resumes


def test_teacher_signal_caches_are_keyed_by_precision(digits_dataset, tmp_path):
    for precision in ("fp32", "bf16"):
        settings = tiny_settings(digits_dataset, str(tmp_path / precision), str(tmp_path / "cache"), baseline=False,
                                 precision=precision, teacher={"epochs": 1}, student={"epochs": 1})
        kdistill.run(settings, log=quiet)
    logits = glob.glob(str(tmp_path / "cache" / "*" / "signal" / "logits-*.pt"))
    assert len(logits) == 2


# ---------------------------------------------------------------- 4. caches checked, not assumed


def test_an_edited_data_cache_of_the_same_size_is_rebuilt(digits_dataset, tmp_path):
    cache = str(tmp_path / "cache")
    first = prepare(digits_dataset, 16, cache, workers=1, log=quiet)
    expected = first.splits["train"].images.clone()
    path = os.path.join(first.folder, "train.npy")
    with open(path, "r+b") as f:  # one pixel changed, size and header intact
        f.seek(os.path.getsize(path) - 10)
        f.write(bytes([(f.read(1)[0] + 1) % 256]))
    messages = []
    again = prepare(digits_dataset, 16, cache, workers=1, log=messages.append)
    assert any("damaged" in m and "train.npy" in m and "rebuilding" in m for m in messages), messages
    assert torch.equal(again.splits["train"].images, expected)
    messages.clear()
    prepare(digits_dataset, 16, cache, workers=1, log=messages.append)
    assert any("reusing the data cache" in m and "content checked in" in m for m in messages)
    meta_path = os.path.join(first.folder, "meta.json")  # edited labels are caught too
    meta = json.load(open(meta_path))
    meta["splits"]["train"]["labels"][0] = 1 - meta["splits"]["train"]["labels"][0]
    json.dump(meta, open(meta_path, "w"))
    messages.clear()
    prepare(digits_dataset, 16, cache, workers=1, log=messages.append)
    assert any("meta.json was edited" in m for m in messages)


def test_an_edited_signal_cache_is_recomputed(digits_dataset, tmp_path):
    settings = tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache"), baseline=False,
                             teacher={"epochs": 1}, student={"epochs": 1})
    kdistill.run(settings, log=quiet)
    [path] = glob.glob(str(tmp_path / "cache" / "*" / "signal" / "logits-*.pt"))
    stored = load_torch(path)
    original = stored["tensors"]["train"].clone()
    stored["tensors"]["train"][0, 0] += 5.0  # same shape, the hash left as it was
    save_torch(stored, path)
    messages = []
    kdistill.run(dict(settings, out=str(tmp_path / "run2")), log=messages.append)
    assert any("does not match its hash" in m for m in messages), messages
    assert torch.equal(load_torch(path)["tensors"]["train"], original)


@pytest.mark.parametrize("change", ["new class", "removed image", "changed image"])
def test_a_run_folder_refuses_other_data_at_the_same_path(digits_dataset, tmp_path, change):
    data = shutil.copytree(digits_dataset, tmp_path / "data")
    settings = tiny_settings(str(data), str(tmp_path / "run"), str(tmp_path / "cache"), baseline=False,
                             teacher={"epochs": 1}, student={"epochs": 1})
    kdistill.run(settings, log=quiet)
    classes = sorted(os.listdir(data / "train"))
    if change == "new class":
        for split in ("train", "val"):
            shutil.copytree(data / split / classes[0], data / split / "zzz")
        expected = "3 classes then, 4 now"
    elif change == "changed image":
        images = sorted(os.listdir(data / "train" / classes[0]))
        shutil.copyfile(data / "train" / classes[0] / images[1], data / "train" / classes[0] / images[0])
        expected = "their content changed"
    else:
        os.remove(data / "train" / classes[0] / sorted(os.listdir(data / "train" / classes[0]))[0])
        expected = "images per split"
    with pytest.raises(KdistillError, match="holds a run on other data") as error:
        kdistill.run(settings, log=quiet)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_a_run_folder_resumes_on_its_files_copied_again_with_new_dates(digits_dataset, tmp_path):
    """As after a restore from backup, or data provisioned again: same files, new mtimes. Run folders
    recorded by an earlier kdistill (data.json keyed by file dates) resume too."""
    data = shutil.copytree(digits_dataset, tmp_path / "data")
    settings = tiny_settings(str(data), str(tmp_path / "run"), str(tmp_path / "cache"), baseline=False,
                             teacher={"epochs": 1}, student={"epochs": 1})
    accuracy = lambda metrics: metrics["models"]["student"]["best_val_acc"]  # noqa: E731
    first = kdistill.run(settings, log=quiet)
    checkpoints = sorted(glob.glob(str(tmp_path / "run" / "checkpoints" / "**" / "*.pt"), recursive=True))
    times = {path: os.stat(path).st_mtime_ns for path in checkpoints}
    shutil.rmtree(data)
    shutil.copytree(digits_dataset, data, copy_function=shutil.copyfile)  # the files' dates are now
    assert accuracy(kdistill.run(settings, log=quiet)) == accuracy(first)
    data_json = tmp_path / "run" / "data.json"
    max_pixels = kdistill.Config().max_image_pixels
    dataset = scan_dataset(str(data))
    assert json.loads(data_json.read_text())["key"] == cache_key(dataset, 16, max_pixels)
    recorded = json.loads(data_json.read_text())
    recorded["key"] = dated_key(dataset, 16, max_pixels)  # as an earlier kdistill wrote it for these files
    data_json.write_text(json.dumps(recorded))
    assert accuracy(kdistill.run(settings, log=quiet)) == accuracy(first)
    assert {path: os.stat(path).st_mtime_ns for path in checkpoints} == times  # nothing trained again
    assert json.loads(data_json.read_text())["key"] == cache_key(dataset, 16, max_pixels)


# ---------------------------------------------------------------- 5. ONNX equality enforced


def seed_nguyen_student() -> Standardized:
    """The seed-nguyen student at its real size: ResNet18, Dropout(0.5)+Linear head, 10 classes."""
    torch.manual_seed(0)
    model, _ = build_model("resnet18", 10, dropout=0.5)
    return Standardized(model, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26])


def test_onnx_export_matches_pytorch_for_the_seed_nguyen_student_at_224_px(tmp_path):
    student = seed_nguyen_student().train()  # left in train mode: the export must still use eval
    probe = torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    difference = export_onnx(str(tmp_path / "student.onnx"), student, probe)
    assert os.path.getsize(tmp_path / "student.onnx") > 40e6 and difference <= ONNX_TOLERANCE["atol"] * 10


def test_an_onnx_file_that_disagrees_with_pytorch_is_not_written(tmp_path, monkeypatch):
    import onnxruntime

    real_run = onnxruntime.InferenceSession.run
    monkeypatch.setattr(onnxruntime.InferenceSession, "run",
                        lambda self, *args, **kwargs: [real_run(self, *args, **kwargs)[0] + 0.05])
    with pytest.raises(KdistillError, match="disagrees with PyTorch") as error:
        export_onnx(str(tmp_path / "student.onnx"), seed_nguyen_student(), torch.rand(2, 3, 64, 64))
    assert "\n" not in str(error.value)
    assert os.listdir(tmp_path) == []  # neither the file nor its temporary


# ---------------------------------------------------------------- 7. bundles run no foreign code


def test_a_bundle_naming_a_foreign_module_is_refused_without_running_it(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "code-ran"
    module = tmp_path / "modules" / "planted_arch.py"
    module.parent.mkdir()
    module.write_text(f"open({str(marker)!r}, 'w').close()\n"
                      "import torchvision\n\ndef build():\n    return torchvision.models.resnet18()\n")
    monkeypatch.syspath_prepend(str(module.parent))
    monkeypatch.delitem(sys.modules, "planted_arch", raising=False)
    run = tmp_path / "run"
    run.mkdir()
    save_bundle(str(run / "student.pt"), seed_nguyen_student(), "planted_arch:build", 0.5, [str(i) for i in range(10)],
                32, "dataset")
    with pytest.raises(KdistillError, match="--trust-arch"):
        load_bundle(str(run / "student.pt"))
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(images / "a.png")
    assert main(["predict", "--run", str(run), "--images", str(images)]) == 2
    error = capsys.readouterr().err
    assert "planted_arch:build" in error and error.count("\n") == 1
    assert not marker.exists()  # the module was never imported
    model, _ = load_bundle(str(run / "student.pt"), trust_arch=True)  # the user's explicit choice
    assert marker.exists() and isinstance(model, Standardized)


# ---------------------------------------------------------------- 10. cheap local checks first


def test_a_missing_data_folder_is_named_before_any_network_access(tmp_path, monkeypatch, capsys):
    downloads = []
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: downloads.append(a))
    code = main(["run", "--data", str(tmp_path / "no" / "such"), "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 2 and "does not exist" in error and str(tmp_path / "no" / "such") in error
    assert downloads == [] and not (tmp_path / "out").exists()
    (tmp_path / "flat").mkdir()  # a folder without train/: the layout is checked first too
    assert main(["run", "--data", str(tmp_path / "flat"), "--out", str(tmp_path / "out")]) == 2
    assert "train" in capsys.readouterr().err and downloads == []


def test_a_run_folder_from_an_older_kdistill_is_refused_in_one_line(digits_dataset, tmp_path):
    import yaml

    from kdistill.config import config_from_dict, save_config

    settings = tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache"))
    save_config(config_from_dict(settings), str(tmp_path / "run" / "config.yaml"))
    saved = yaml.safe_load(open(tmp_path / "run" / "config.yaml"))
    del saved["precision"], saved["student"]["normalize"]  # settings an older kdistill did not have
    yaml.safe_dump(saved, open(tmp_path / "run" / "config.yaml", "w"))
    (tmp_path / "run" / "checkpoints").mkdir()
    with pytest.raises(KdistillError, match="older kdistill") as error:
        kdistill.run(settings, log=quiet)
    assert "precision" in str(error.value) and "student.normalize" in str(error.value)


def test_a_run_folder_without_the_settings_added_later_resumes_when_their_values_repeat_it(tmp_path):
    import yaml

    from kdistill.config import config_from_dict, save_config

    def saved_without(names, **distill):
        settings = {"data": "unused", "out": str(tmp_path / "run"), "distill": distill}
        cfg = config_from_dict(settings)
        save_config(cfg, str(tmp_path / "run" / "config.yaml"))
        saved = yaml.safe_load(open(tmp_path / "run" / "config.yaml"))
        for name in names:
            *sections, key = name.split(".")
            section = saved
            for part in sections:
                section = section[part]
            del section[key]
        yaml.safe_dump(saved, open(tmp_path / "run" / "config.yaml", "w"))
        return cfg

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    later = ["sync_bn", "ddp_timeout_s", "deploy_check", "ensemble", "distill.ensemble_weights",
             "distill.max_signal_memory_gb", "teacher.input_size", "student.input_size", "distill.dml.peer",
             "distill.born_again.generations", "distill.feature_storage"]
    out_folder.check_out_folder(saved_without(later, method="kd"), None, {})  # none of them changes a kd run
    # Stored teacher features replaced features computed online: a feature method's folder is refused,
    # and so is one missing a setting of the method it uses.
    for names, method in ((later, "fitnets"), (["distill.dml.peer"], "dml")):
        with pytest.raises(KdistillError, match="older kdistill") as error:
            out_folder.check_out_folder(saved_without(names, method=method), None, {})
        assert names[-1 if method == "dml" else 5] in str(error.value)
    # Teacher features had one storage, float16: under auto a feature method's folder is refused with the
    # setting that repeats it, and resumes under that setting.
    with pytest.raises(KdistillError, match="older kdistill") as error:
        out_folder.check_out_folder(saved_without(["distill.feature_storage"], method="fitnets"), None, {})
    assert "or set distill.feature_storage=float16 to go on as it began" in str(error.value)
    out_folder.check_out_folder(saved_without(["distill.feature_storage"], method="fitnets",
                                              feature_storage="float16"), None, {})


def test_auto_precision_is_bf16_on_cuda_and_on_cpus_with_bf16_units(monkeypatch):
    from kdistill import compute

    monkeypatch.setattr(compute, "cpu_has_bf16", lambda: True)
    assert compute.resolve_precision("auto", CPU) == "bf16"
    assert compute.resolve_precision("fp32", CPU) == "fp32"  # the setting that turns it off
    monkeypatch.setattr(compute, "cpu_has_bf16", lambda: False)
    assert compute.resolve_precision("auto", CPU) == "fp32"
    assert compute.resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert compute.Compute(CPU, "bf16").channels_last and not compute.Compute(CPU, "fp32").channels_last


def test_cpu_bf16_units_are_read_from_the_cpu_flags(monkeypatch, tmp_path):
    from kdistill import compute

    real_open = open
    for flags, expected in (("fpu sse avx512f avx512_bf16", True), ("fpu amx_bf16 amx_tile", True),
                            ("fpu sse avx2 avx512f", False)):
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(
            cpuinfo if path == "/proc/cpuinfo" else path, *a, **k))
        assert compute.cpu_has_bf16() is expected
        monkeypatch.undo()
