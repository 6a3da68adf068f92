"""Augmentation as view parameters, stored views (FKD) replayed exactly, and mixing."""
import glob

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.transforms.v2 import functional as TF

import kdistill
from conftest import tiny_settings
from kdistill import pipeline, teacher
from kdistill.augment import BatchMixer
from kdistill.augmentations import draw_views, stored_views
from kdistill.augmentations.crop_flip import crop_padding
from kdistill.augmentations.flip import apply_views
from kdistill.augmentations.rrc_flip import apply_boxes
from kdistill.config import build_config
from kdistill.distillers import KD, CrossEntropy
from kdistill.errors import KdistillError
from kdistill.models import build_model
from kdistill.batches import Batches
from kdistill.inference import predict_logits

CPU = torch.device("cpu")
quiet = lambda message: None  # noqa: E731
APPLY = {"crop_flip": lambda x, v: apply_views(x, v, crop_padding(16)),
         "rrc_flip": lambda x, v: apply_boxes(x, v, 16)}


def test_a_view_is_the_crop_of_the_padded_image_then_the_flip():
    x = torch.randn(3, 3, 16, 16)
    pad = crop_padding(16)
    views = torch.tensor([[0, pad, pad], [1, 0, 4], [0, 2 * pad, 1]])
    out = apply_views(x, views, pad)
    padded = F.pad(x, (pad,) * 4, mode="reflect")
    assert torch.equal(out[0], x[0])  # centred crop, no flip: the image itself
    assert torch.equal(out[1], padded[1, :, 0:16, 4:20].flip(2))
    assert torch.equal(out[2], padded[2, :, 2 * pad:2 * pad + 16, 1:17])
    flips = torch.tensor([[1, 0, 0], [0, 0, 0], [1, 0, 0]])
    assert torch.equal(apply_views(x, flips, 0), torch.stack([x[0].flip(2), x[1], x[2].flip(2)]))


def test_a_resized_crop_view_is_torchvisions_resized_crop_then_the_flip():
    x = torch.rand(3, 3, 16, 16)
    # (flip, top, left, height, width): a box at the top-left corner, one inside, the whole image.
    views = torch.tensor([[0, 0, 0, 9, 12], [1, 3, 2, 10, 7], [1, 0, 0, 16, 16]])
    out = apply_boxes(x, views, 16)
    expected = [TF.resized_crop(x[i], *views[i, 1:].tolist(), [16, 16], antialias=False) for i in range(3)]
    # Bilinear sampling is the same; only the last row and column of an upscaled box differ: the
    # box reads the pixel just outside it there (a box is its area), resized_crop its own edge pixel.
    torch.testing.assert_close(out[0, :, :-1, :-1], expected[0][:, :-1, :-1], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1, :, 1:-1, 1:-1], expected[1].flip(2)[:, 1:-1, 1:-1], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[2], x[2].flip(2), rtol=0, atol=1e-6)  # the whole image, flipped
    border = (out[0] - expected[0]).abs()
    assert border.max() < (x[0, :, :10, :13].diff(dim=1).abs().max() + x[0, :, :10, :13].diff(dim=2).abs().max())


def test_drawn_boxes_respect_the_scale_and_ratio_ranges():
    size, scale, ratio = 64, (0.2, 0.6), (0.5, 2.0)
    params = {"rrc_scale": scale, "rrc_ratio": ratio}
    views = draw_views("rrc_flip", 4000, size, torch.Generator().manual_seed(0), params)
    assert views.shape == (4000, 5) and views[:, 0].unique().tolist() == [0, 1]
    assert torch.equal(views, draw_views("rrc_flip", 4000, size, torch.Generator().manual_seed(0), params))
    top, left, height, width = views[:, 1:].double().unbind(1)
    assert top.min() == 0 and left.min() == 0 and (top + height).max() == size and (left + width).max() == size
    assert ((top + height) <= size).all() and ((left + width) <= size).all()
    # Within the ranges up to rounding each side to whole pixels, and spanning them.
    rounding = (0.5 * (height + width) + 0.25) / size ** 2
    share = height * width / size ** 2
    assert (share >= scale[0] - rounding).all() and (share <= scale[1] + rounding).all()
    assert share.min() < scale[0] + 0.02 and share.max() > scale[1] - 0.02
    assert ((width + 0.5) / (height - 0.5) >= ratio[0]).all() and ((width - 0.5) / (height + 0.5) <= ratio[1]).all()
    assert (width / height).min() < 0.55 and (width / height).max() > 1.8
    # No box fits (too wide for the scale): torchvision's fallback, a centred box of the nearest ratio.
    fallback = draw_views("rrc_flip", 5, size, torch.Generator().manual_seed(0),
                          {"rrc_scale": (0.95, 1.0), "rrc_ratio": (1.5, 2.0)})
    expected = torchvision.transforms.RandomResizedCrop.get_params(torch.zeros(3, size, size), [0.95, 1.0], [1.5, 2.0])
    assert fallback[:, 1:].tolist() == [list(expected)] * 5


def test_drawn_views_stay_inside_the_padded_image_and_vary():
    views = draw_views("crop_flip", 2000, 32, torch.Generator().manual_seed(0))
    pad = crop_padding(32)
    assert views.shape == (2000, 3) and views[:, 0].unique().tolist() == [0, 1]
    assert views[:, 1:].min() == 0 and views[:, 1:].max() == 2 * pad
    assert draw_views("flip", 50, 32)[:, 1:].abs().sum() == 0


def test_stored_views_are_reproducible_and_flip_stores_both_views():
    a, b = stored_views("crop_flip", 10, 4, 32, seed=3), stored_views("crop_flip", 10, 4, 32, seed=3)
    assert a.shape == (10, 4, 3) and torch.equal(a, b)
    assert not torch.equal(a, stored_views("crop_flip", 10, 4, 32, seed=4))
    flip = stored_views("flip", 10, 8, 32, seed=0)
    assert flip.shape == (10, 2, 3) and flip[:, :, 0].tolist() == [[0, 1]] * 10


@pytest.mark.parametrize("kind", ["crop_flip", "rrc_flip"])
def test_each_served_view_comes_with_the_teacher_logits_of_that_exact_view(kind):
    torch.manual_seed(0)
    teacher, _ = build_model("resnet18", 4)
    teacher.eval()
    images = torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8)
    views = stored_views(kind, 24, 3, 16, seed=0)
    assert views.shape == (24, 3, 5 if kind == "rrc_flip" else 3)

    def batches(**extra):
        return Batches(images, torch.arange(24) % 4, lambda x: x.float() / 255 - 0.5, apply_view=APPLY[kind],
                       **extra)
    logits = torch.stack([predict_logits(teacher, batches(views=views[:, k:k + 1]), 8, CPU) for k in range(3)], 1)
    served = batches(views=views, extras={"teacher_logits": logits})
    generator = torch.Generator().manual_seed(1)
    for x, _, teacher_said, _ in served.iterate(5, CPU, shuffle=True, generator=generator):
        with torch.no_grad():
            torch.testing.assert_close(teacher_said.logits, teacher(x), rtol=1e-4, atol=1e-4)
    # In order (no shuffle), image i is always served as one of its own K stored views, and over
    # epochs as several of them.
    renderings = torch.stack([APPLY[kind](images.float() / 255 - 0.5, views[:, k]) for k in range(3)],
                             1)  # (N, K, C, H, W)
    picked = [set() for _ in range(24)]
    view_generator = torch.Generator().manual_seed(2)
    for epoch in range(6):
        x = torch.cat([batch.x for batch in served.iterate(8, CPU, view_generator=view_generator)])
        for i in range(24):
            matches = [k for k in range(3) if torch.equal(x[i], renderings[i, k])]
            assert matches, f"image {i} was served in a view it does not have"
            picked[i].add(matches[0])
    assert sum(len(ks) > 1 for ks in picked) >= 20


def test_runs_with_stored_views(digits_dataset, tmp_path):
    # flip: both views stored automatically; crop_flip and rrc_flip: K random views on request.
    for augment, signal, count in (("flip", "auto", 2), ("crop_flip", "views", 3), ("rrc_flip", "views", 3)):
        cache = tmp_path / f"cache-{augment}"
        settings = tiny_settings(digits_dataset, str(tmp_path / augment), str(cache), augment=augment,
                                 baseline=False, teacher={"epochs": 1}, student={"epochs": 2},
                                 distill={"teacher_signal": signal, "views": 3})
        metrics = kdistill.run(settings, log=lambda m: None)
        assert metrics["teacher_signal"] == "views"
        [stored] = glob.glob(str(cache / "*" / "signal" / "views-*.pt"))
        images, classes = 3 * 24, 3
        assert torch.load(stored, weights_only=True)["tensors"]["train"].shape == (images, count, classes)


# ---------------------------------------------------------------- mixing


def test_mixup_mixes_each_image_and_its_label_with_its_partner_and_leaves_the_global_rng_alone():
    x, labels = torch.rand(8, 3, 8, 8), torch.arange(8) % 4  # neighbours always differ in class
    global_state = torch.get_rng_state()
    mixed, soft = BatchMixer("mixup", 4, 0.4, 1.0)(x, labels, torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), global_state)
    partner = labels.roll(1)  # each image is mixed with the one before it in the shuffled batch
    lam = soft[0, labels[0]].item()
    assert 0 < lam < 1
    one_hot = F.one_hot(labels, 4).float()
    torch.testing.assert_close(soft, lam * one_hot + (1 - lam) * F.one_hot(partner, 4).float())
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.roll(1, 0))
    again, _ = BatchMixer("mixup", 4, 0.4, 1.0)(x, labels, torch.Generator().manual_seed(5))
    assert torch.equal(again, mixed)  # the generator decides everything
    # The objectives take the probabilities as they are: CE of the mixture is the mixture of CEs.
    logits, teacher_logits = torch.randn(8, 4), torch.randn(8, 4)
    expected_ce = lam * F.cross_entropy(logits, labels) + (1 - lam) * F.cross_entropy(logits, partner)
    torch.testing.assert_close(CrossEntropy().logit_terms(logits, soft)["loss"], expected_ce)
    terms = KD(temperature=2.0, alpha=0.3).logit_terms(logits, soft, teacher_logits)
    torch.testing.assert_close(terms["ce"], expected_ce)
    torch.testing.assert_close(terms["loss"], 0.3 * terms["kd"] + 0.7 * expected_ce)


def test_cutmix_pastes_one_box_of_the_partner_and_weighs_labels_by_area():
    x, labels = torch.rand(8, 3, 16, 16), torch.arange(8) % 4
    for seed in range(20):
        mixed, soft = BatchMixer("cutmix", 4, 0.2, 1.0)(x, labels, torch.Generator().manual_seed(seed))
        pasted = (mixed != x).any(1)  # (B, H, W): pixels taken from the partner (x is continuous)
        if pasted.any():
            break
    assert pasted.any(), "no box pasted in 20 batches"
    torch.testing.assert_close(mixed, torch.where(pasted.unsqueeze(1), x.roll(1, 0), x), rtol=0, atol=0)
    box = pasted[0]
    assert (pasted == box).all()  # one box for the whole batch
    rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
    assert box.sum() == len(rows) * len(cols) and box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    lam = 1 - box.sum().item() / box.numel()
    expected = lam * F.one_hot(labels, 4).float() + (1 - lam) * F.one_hot(labels.roll(1), 4).float()
    torch.testing.assert_close(soft, expected)


def test_mixing_needs_an_online_teacher():
    for signal in ("cached", "views"):
        with pytest.raises(KdistillError) as error:
            build_config(sets=["augment=rrc_flip", "mix=mixup", f"distill.teacher_signal={signal}"])
        message = str(error.value)
        assert "\n" not in message and message.startswith("setting distill.teacher_signal") and "mix" in message
    assert build_config(sets=["mix=cutmix"]).signal_mode() == "online"
    assert build_config(sets=["augment=flip", "mix=both"]).signal_mode() == "online"
    assert build_config(sets=["augment=rrc_flip"]).signal_mode() == "online"  # 8 views, 40 epochs: views repeat
    # As many stored views as epochs: each epoch can have its own view, so auto stores them (FKD).
    assert build_config(sets=["augment=rrc_flip", "distill.views=40"]).signal_mode() == "views"
    assert build_config(sets=["augment=crop_flip", "distill.views=10", "student.epochs=10"]).signal_mode() == "views"
    assert build_config(sets=["augment=crop_flip", "distill.views=9", "student.epochs=10"]).signal_mode() == "online"
    assert build_config(sets=["augment=rrc_flip", "distill.views=40", "mix=mixup"]).signal_mode() == "online"
    assert build_config(sets=["augment=rrc_flip", "distill.teacher_signal=views"]).signal_mode() == "views"
    for bad in ("rrc_scale=0.5", "rrc_scale=0.6,0.4", "rrc_scale=[0, 1]", "rrc_ratio=2,1", "rrc_ratio=a,b"):
        with pytest.raises(KdistillError, match=f"setting {bad.partition('=')[0]} "):
            build_config(sets=[bad])


def test_student_and_baseline_see_identical_mixed_inputs(digits_dataset, tmp_path, monkeypatch):
    seen, real_fit = {}, pipeline.fit

    def recording_fit(name, model, trainable, train, *args, **kwargs):
        real_iterate = train.iterate

        def iterate(*iterate_args, **iterate_kwargs):
            for batch in real_iterate(*iterate_args, **iterate_kwargs):
                seen.setdefault(name, []).append((batch.x.clone(), batch.labels.clone(), batch.teacher is not None))
                yield batch
        train.iterate = iterate
        return real_fit(name, model, trainable, train, *args, **kwargs)
    monkeypatch.setattr(pipeline, "fit", recording_fit)
    monkeypatch.setattr(teacher, "fit", recording_fit)  # the teacher trains through teacher.py
    settings = tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache"), augment="rrc_flip",
                             mix="both", teacher={"epochs": 1}, student={"epochs": 2})
    metrics = kdistill.run(settings, log=quiet)
    assert metrics["teacher_signal"] == "online (mixed batches)"
    student, baseline = seen["student"], seen["baseline"]
    assert len(student) == len(baseline) == 2 * 5  # 72 images in batches of 16, 2 epochs
    for batch, ((x, y, taught), (bx, by, btaught)) in enumerate(zip(student, baseline)):
        assert torch.equal(x, bx) and torch.equal(y, by), f"batch {batch} differs"
        assert taught and not btaught
    labels = torch.cat([y for _, y, _ in student])
    assert labels.shape[1] == 3 and (labels.max(1).values < 1).any()  # mixed: probabilities, some not one-hot
    assert all(y.dim() == 1 for _, y, _ in seen["teacher"])  # the teacher trains on unmixed labels


def test_the_signal_plan_says_why_in_one_place():
    """Config.signal_plan decides the kind and its reason once; the log and metrics.json repeat it."""
    assert build_config().signal_plan().reason == "no augmentation: one exact output per image"
    assert build_config(sets=["augment=rrc_flip"]).signal_plan() == (
        "online", "augment=rrc_flip with distill.views=8 stored views per image, fewer than student.epochs=40")
    assert build_config(sets=["mix=cutmix"]).signal_plan().reason.startswith("mix=cutmix")
    assert build_config(sets=["augment=flip", "distill.teacher_signal=online"]).signal_plan() == (
        "online", "distill.teacher_signal=online")


def test_an_augmentation_is_one_file_and_a_registry_line(digits_dataset, tmp_path, monkeypatch):
    """A vertical flip added the way docs/extending.md says: it is a valid `augment`, its views are
    drawn, applied on the device and stored for the teacher like the built-in ones."""
    import kdistill
    from kdistill import augmentations, config
    from kdistill.augmentations.flip import Flip

    class VerticalFlip(Flip):
        def apply(self, x, views, image_size):
            return torch.where(views[:, 0].view(-1, 1, 1, 1).bool(), x.flip(2), x)

    monkeypatch.setitem(augmentations.AUGMENTATIONS, "vflip", VerticalFlip())
    monkeypatch.setattr(config.Config.__dataclass_fields__["augment"], "metadata",
                        {**config.Config.__dataclass_fields__["augment"].metadata,
                         "choices": ("none", *augmentations.AUGMENTATIONS)})
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    out = augmentations.AUGMENTATIONS["vflip"].apply(x, torch.tensor([[1, 0, 0], [0, 0, 0]]), 4)
    assert torch.equal(out[0], x[0].flip(1)) and torch.equal(out[1], x[1])
    lines = []
    metrics = kdistill.run(tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache"), augment="vflip",
                                         teacher={"arch": "tiny_nets:tiny_teacher", "epochs": 1},
                                         student={"arch": "tiny_nets:tiny_student", "epochs": 2}), log=lines.append)
    assert metrics["teacher_signal"] == "views" and "all 2 views of every image stored" in metrics["teacher_signal_reason"]
