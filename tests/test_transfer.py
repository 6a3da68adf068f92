"""The transfer set (distill.unlabeled): unlabelled images the teacher labels, learned by the
student through the teacher's terms only; the baseline trains without them."""
import os
import shutil

import pytest
import torch
from conftest import tiny_settings

import kdistill
from kdistill import pipeline
from kdistill.batcher import JoinedImages
from kdistill.config import build_config
from kdistill.distillers import KD, CrossEntropy
from kdistill.errors import KdistillError
from kdistill.fileio import load_torch
from kdistill.models import standardized_model


def quiet(message: str) -> None:
    pass


def test_joined_images_index_both_parts_in_order():
    first, second = torch.arange(5 * 2).view(5, 2), torch.arange(100, 100 + 3 * 2).view(3, 2)
    joined = JoinedImages(first, second)
    assert len(joined) == 8
    index = torch.tensor([7, 0, 5, 4, 6])
    torch.testing.assert_close(joined[index], torch.cat([first, second])[index])


def test_unlabelled_images_drop_out_of_the_labels_term_only():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(4, 3, generator=generator), torch.randn(4, 3, generator=generator)
    labels = torch.tensor([2, -1, 0, -1])
    terms = KD(temperature=2.0, alpha=0.3).logit_terms(student, labels, teacher)
    # CE over the two labelled images only; KD over all four.
    torch.testing.assert_close(terms["ce"], torch.nn.functional.cross_entropy(student[[0, 2]], labels[[0, 2]]))
    torch.testing.assert_close(terms["kd"], KD(temperature=2.0, alpha=0.3).logit_terms(student, torch.zeros(4, dtype=torch.long),
                                                                       teacher)["kd"])
    # A batch of unlabelled images only: no labels' term at all, and the loss still has a gradient.
    student.requires_grad_(True)
    only_unlabelled = KD(temperature=2.0, alpha=0.3).logit_terms(student, torch.full((4,), -1), teacher)
    assert only_unlabelled["ce"].item() == 0.0
    only_unlabelled["loss"].backward()
    assert student.grad.abs().sum() > 0
    assert CrossEntropy().logit_terms(student, torch.full((4,), -1))["loss"].item() == 0.0


def record_batches(monkeypatch) -> dict:
    seen: dict[str, list] = {}
    real_fit = pipeline.fit

    def recording_fit(name, model, trainable, train, *args, **kwargs):
        real_iterate = train.iterate

        def iterate(*iterate_args, **iterate_kwargs):
            for batch in real_iterate(*iterate_args, **iterate_kwargs):
                teacher = None if batch.teacher is None else batch.teacher.logits.clone()
                seen.setdefault(name, []).append((batch.x.clone(), batch.labels.clone(), teacher))
                yield batch
        train.iterate = iterate
        return real_fit(name, model, trainable, train, *args, **kwargs)
    monkeypatch.setattr(pipeline, "fit", recording_fit)
    return seen


@pytest.mark.parametrize("augment", ["none", "flip"])
def test_test_images_join_the_student_training_set_with_the_teachers_labels(digits_dataset, tmp_path, monkeypatch,
                                                                             augment):
    seen = record_batches(monkeypatch)
    settings = tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache"), augment=augment,
                             teacher={"mode": "head", "epochs": 1}, student={"epochs": 1, "lr_step": 0},
                             distill={"unlabeled": "test"})
    metrics = kdistill.run(settings, log=quiet)
    assert metrics["transfer_set"] == {"source": "test", "images": 10}
    student_labels = torch.cat([labels for _, labels, _ in seen["student"]])
    baseline_labels = torch.cat([labels for _, labels, _ in seen["baseline"]])
    assert len(student_labels) == 72 + 10 and (student_labels == -1).sum() == 10  # one epoch
    assert len(baseline_labels) == 72 and (baseline_labels >= 0).all()
    # The signal on each unlabelled image is the saved teacher's on exactly the input the student saw.
    teacher, _, _ = standardized_model("resnet18", 3, 0.0, "none", "dataset", [0.0] * 3, [1.0] * 3)
    teacher.load_state_dict(load_torch(str(tmp_path / "run" / "models" / "teacher.pt")))
    teacher.eval()
    for x, labels, teacher_logits in seen["student"]:
        with torch.no_grad():
            torch.testing.assert_close(teacher_logits, teacher(x), rtol=1e-4, atol=1e-4)
    report = open(tmp_path / "run" / "report.md").read()
    assert "Transfer set: 10 unlabelled images (the run's DATA/test images)" in report


def test_a_folder_of_unlabelled_images_is_a_transfer_set(digits_dataset, tmp_path, monkeypatch):
    folder = tmp_path / "extra"
    shutil.copytree(os.path.join(digits_dataset, "test"), folder / "nested")  # images at any depth
    seen = record_batches(monkeypatch)
    settings = tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache"), augment="crop_flip",
                             baseline=False, teacher={"epochs": 1}, student={"epochs": 1, "lr_step": 0},
                             distill={"unlabeled": str(folder), "teacher_signal": "online"})
    metrics = kdistill.run(settings, log=quiet)
    assert metrics["teacher_signal"] == "online"
    assert metrics["transfer_set"] == {"source": str(folder), "images": 10}
    assert metrics["images"]["unlabeled"] == 10
    assert sum(int((labels == -1).sum()) for _, labels, _ in seen["student"]) == 10


def test_transfer_set_settings_fail_in_one_line(digits_dataset, tmp_path):
    with pytest.raises(KdistillError, match="distill.unlabeled"):
        build_config(sets=[f"distill.unlabeled={tmp_path / 'missing'}"])
    with pytest.raises(KdistillError, match="distill.unlabeled.*mix"):
        build_config(sets=["distill.unlabeled=test", "mix=mixup"])
    no_test = tmp_path / "no-test"
    shutil.copytree(digits_dataset, no_test, ignore=shutil.ignore_patterns("test"))
    settings = tiny_settings(str(no_test), str(tmp_path / "run"), str(tmp_path / "cache"),
                             distill={"unlabeled": "test"})
    with pytest.raises(KdistillError, match="distill.unlabeled is test but .*test has no images"):
        kdistill.run(settings, log=quiet)
    empty = tmp_path / "empty"
    empty.mkdir()
    settings["distill"]["unlabeled"] = str(empty)
    with pytest.raises(KdistillError, match=f"distill.unlabeled: {empty} has no images"):
        kdistill.run(settings, log=quiet)
