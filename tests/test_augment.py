"""Augmentation as view parameters, and stored views (FKD) replayed exactly."""
import glob

import torch
import torch.nn.functional as F

import kdistill
from conftest import tiny_settings
from kdistill.augment import apply_views, crop_padding, draw_views, stored_views
from kdistill.models import build_model
from kdistill.train import Batches, predict_logits

CPU = torch.device("cpu")


def test_a_view_is_the_crop_of_the_padded_image_then_the_flip():
    x = torch.randn(3, 3, 16, 16)
    pad = crop_padding("crop_flip", 16)
    views = torch.tensor([[0, pad, pad], [1, 0, 4], [0, 2 * pad, 1]])
    out = apply_views(x, views, pad)
    padded = F.pad(x, (pad,) * 4, mode="reflect")
    assert torch.equal(out[0], x[0])  # centred crop, no flip: the image itself
    assert torch.equal(out[1], padded[1, :, 0:16, 4:20].flip(2))
    assert torch.equal(out[2], padded[2, :, 2 * pad:2 * pad + 16, 1:17])
    flips = torch.tensor([[1, 0, 0], [0, 0, 0], [1, 0, 0]])
    assert torch.equal(apply_views(x, flips, 0), torch.stack([x[0].flip(2), x[1], x[2].flip(2)]))


def test_drawn_views_stay_inside_the_padded_image_and_vary():
    views = draw_views("crop_flip", 2000, 32, torch.Generator().manual_seed(0))
    pad = crop_padding("crop_flip", 32)
    assert views.shape == (2000, 3) and views[:, 0].unique().tolist() == [0, 1]
    assert views[:, 1:].min() == 0 and views[:, 1:].max() == 2 * pad
    assert draw_views("flip", 50, 32)[:, 1:].abs().sum() == 0


def test_stored_views_are_reproducible_and_flip_stores_both_views():
    a, b = stored_views("crop_flip", 10, 4, 32, seed=3), stored_views("crop_flip", 10, 4, 32, seed=3)
    assert a.shape == (10, 4, 3) and torch.equal(a, b)
    assert not torch.equal(a, stored_views("crop_flip", 10, 4, 32, seed=4))
    flip = stored_views("flip", 10, 8, 32, seed=0)
    assert flip.shape == (10, 2, 3) and flip[:, :, 0].tolist() == [[0, 1]] * 10


def test_each_served_view_comes_with_the_teacher_logits_of_that_exact_view():
    torch.manual_seed(0)
    teacher, _ = build_model("resnet18", 4)
    teacher.eval()
    images = torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8)
    views = stored_views("crop_flip", 24, 3, 16, seed=0)

    def batches(**extra):
        return Batches(images, torch.arange(24) % 4, lambda x: x.float() / 255 - 0.5,
                       apply_view=lambda x, v: apply_views(x, v, crop_padding("crop_flip", 16)), **extra)
    logits = torch.stack([predict_logits(teacher, batches(views=views[:, k:k + 1]), 8, CPU) for k in range(3)], 1)
    served = batches(views=views, extras={"teacher_logits": logits})
    generator = torch.Generator().manual_seed(1)
    for x, _, teacher_logits in served.iterate(5, CPU, shuffle=True, generator=generator):
        with torch.no_grad():
            torch.testing.assert_close(teacher_logits, teacher(x), rtol=1e-4, atol=1e-4)
    # In order (no shuffle), image i is always served as one of its own K stored views, and over
    # epochs as several of them.
    renderings = torch.stack([apply_views(images.float() / 255 - 0.5, views[:, k], crop_padding("crop_flip", 16))
                              for k in range(3)], 1)  # (N, K, C, H, W)
    picked = [set() for _ in range(24)]
    view_generator = torch.Generator().manual_seed(2)
    for epoch in range(6):
        x = torch.cat([x for x, _, _ in served.iterate(8, CPU, view_generator=view_generator)])
        for i in range(24):
            matches = [k for k in range(3) if torch.equal(x[i], renderings[i, k])]
            assert matches, f"image {i} was served in a view it does not have"
            picked[i].add(matches[0])
    assert sum(len(ks) > 1 for ks in picked) >= 20


def test_runs_with_stored_views(digits_dataset, tmp_path):
    # flip: both views stored automatically; crop_flip: K random views on request.
    for augment, signal, count in (("flip", "auto", 2), ("crop_flip", "views", 3)):
        cache = tmp_path / f"cache-{augment}"
        settings = tiny_settings(digits_dataset, str(tmp_path / augment), str(cache), augment=augment,
                                 baseline=False, teacher={"epochs": 1}, student={"epochs": 2},
                                 distill={"teacher_signal": signal, "views": 3})
        metrics = kdistill.run(settings, log=lambda m: None)
        assert metrics["teacher_signal"] == "views"
        [stored] = glob.glob(str(cache / "*" / "signal" / "views-*.pt"))
        images, classes = 3 * 24, 3
        assert torch.load(stored, weights_only=True)["tensors"]["train"].shape == (images, count, classes)
