import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from conftest import write_digits_dataset
from kdistill.data import prepare, scan_dataset, to_unit_range
from kdistill import data_key
from kdistill.data_key import INDEX_FOLDER, cache_key, dated_key
from kdistill.images import load_image


# Variants of scikit-learn's two bundled 640x427 photos: (file name, width, height, grayscale).
# Portrait, panorama, odd, grayscale and smaller-than-the-crop sizes, so resizing and cropping
# are checked on every kind of shape.
PHOTO_VARIANTS = [("a-landscape", 640, 427, False), ("b-portrait", 300, 500, False),
                  ("c-panorama", 1000, 200, False), ("d-odd", 97, 131, False),
                  ("e-gray", 200, 150, True), ("f-tiny", 40, 30, False)]


def crop_to_aspect(image: Image.Image, width: int, height: int) -> Image.Image:
    """The largest centered box of the photo with the aspect ratio width:height."""
    box_w = min(image.width, round(image.height * width / height))
    box_h = min(image.height, round(image.width * height / width))
    left, top = (image.width - box_w) // 2, (image.height - box_h) // 2
    return image.crop((left, top, left + box_w, top + box_h))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Real photos as JPEGs of many sizes: classes china and flower, 3 train + 3 val images each.

    china's training images are the first three variants and flower's the last three, so the
    training split holds every variant.
    """
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("photos") / "data"
    bundled = load_sample_images()
    for name, pixels in zip(("china", "flower"), bundled.images):
        photo = Image.fromarray(pixels)
        for position, (variant, width, height, gray) in enumerate(PHOTO_VARIANTS):
            first_half = position < len(PHOTO_VARIANTS) // 2
            split = "train" if first_half == (name == "china") else "val"
            image = crop_to_aspect(photo, width, height).resize((width, height), Image.LANCZOS)
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            (image.convert("L") if gray else image).save(folder / f"{variant}.jpg", quality=90)
    return str(root)


def reference_tensor(path: str, size: int) -> np.ndarray:
    """The seed preprocessing with torchvision directly: Resize(size) then CenterCrop(size)."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        cropped = TF.center_crop(TF.resize(image, size), size)
    return np.asarray(cropped).transpose(2, 0, 1)


def test_prepare_shapes_crop_and_statistics_match_an_independent_computation(photos, tmp_path):
    size = 48
    data = prepare(photos, size, str(tmp_path / "cache"), workers=2)
    train = data.splits["train"]
    assert data.classes == ["china", "flower"]
    assert train.images.shape == (6, 3, size, size) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert [os.path.basename(name)[:-4] for name in train.files] == [v[0] for v in PHOTO_VARIANTS]
    assert data.splits["val"].images.shape == (6, 3, size, size)
    references = []
    for index, name in enumerate(train.files):
        reference = reference_tensor(os.path.join(photos, "train", name), size)
        references.append(reference)
        difference = np.abs(train.images[index].numpy().astype(int) - reference.astype(int))
        assert difference.max() <= 1, name
    stacked = np.stack(references).astype(np.float64) / 255
    np.testing.assert_allclose(data.mean, stacked.mean(axis=(0, 2, 3)), atol=2e-3)
    np.testing.assert_allclose(data.std, stacked.std(axis=(0, 2, 3)), atol=2e-3)
    # Standardized on the device, the training split has mean ~0 and std ~1 per channel.
    mean = torch.tensor(data.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.std).view(1, 3, 1, 1)
    standardized = (to_unit_range(train.images) - mean) / std
    assert standardized.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (standardized.std(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-3


def test_cache_is_reused_and_rebuilt_when_the_data_changes(photos, tmp_path):
    messages = []
    cache = str(tmp_path / "cache")
    first = prepare(photos, 32, cache, workers=1, log=messages.append)
    assert any("decoded 12 images" in m for m in messages)
    messages.clear()
    second = prepare(photos, 32, cache, workers=1, log=messages.append)
    assert second.key == first.key and any("reusing the data cache" in m for m in messages)
    assert torch.equal(first.splits["train"].images, second.splits["train"].images)
    # Another image size is another cache.
    assert prepare(photos, 24, cache, workers=1, log=messages.append).key != first.key
    # Touching a file (new mtime) keeps the key: the data is keyed by content. Only that file is read again.
    victim = os.path.join(photos, "train", "china", sorted(os.listdir(os.path.join(photos, "train", "china")))[0])
    stat = os.stat(victim)
    original = open(victim, "rb").read()
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    messages.clear()
    try:
        assert prepare(photos, 32, cache, workers=1, log=messages.append).key == first.key
        assert any("hashed 1 new or changed files" in m for m in messages)
        assert any("reusing the data cache" in m for m in messages)
        # New content (another photo's) is a new key.
        other = os.path.join(photos, "train", "china", sorted(os.listdir(os.path.join(photos, "train", "china")))[1])
        shutil.copyfile(other, victim)
        assert prepare(photos, 32, cache, workers=1, log=messages.append).key != first.key
    finally:
        with open(victim, "wb") as f:
            f.write(original)
        os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_the_data_key_is_the_files_content_whatever_their_dates_and_folder(photos, tmp_path):
    cache = str(tmp_path / "cache")
    original = scan_dataset(photos, cache_dir=cache)
    assert any("hashed 12 new or changed files" in notice for notice in original.notices)
    assert not any("hashed" in notice for notice in scan_dataset(photos, cache_dir=cache).notices)  # the index
    # A copy elsewhere with new dates, as a restore or a provisioning without times gives.
    copy = shutil.copytree(photos, tmp_path / "copy", copy_function=shutil.copyfile)
    copied = scan_dataset(str(copy), cache_dir=cache)
    assert copied.splits["train"].stats != original.splits["train"].stats
    assert cache_key(copied, 32, 10**8) == cache_key(original, 32, 10**8)
    assert dated_key(copied, 32, 10**8) != dated_key(original, 32, 10**8)
    # Without an index every file is read, and the key is the same.
    assert cache_key(scan_dataset(str(copy)), 32, 10**8) == cache_key(original, 32, 10**8)
    # A damaged index is read past: the files are hashed again.
    for name in os.listdir(os.path.join(cache, INDEX_FOLDER)):
        with open(os.path.join(cache, INDEX_FOLDER, name), "w") as f:
            f.write("{not json")
    again = scan_dataset(photos, cache_dir=cache)
    assert any("hashed 12 new or changed files" in notice for notice in again.notices)
    assert cache_key(again, 32, 10**8) == cache_key(original, 32, 10**8)


def test_a_file_that_could_not_be_read_is_hashed_again_once_it_can(photos, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    victim = os.path.join(photos, "train", "china", sorted(os.listdir(os.path.join(photos, "train", "china")))[0])
    readable_hash = data_key.file_sha256

    def refuse(path, **kwargs):
        if path == victim:
            raise PermissionError(13, "Permission denied", path)
        return readable_hash(path, **kwargs)
    monkeypatch.setattr(data_key, "file_sha256", refuse)
    locked = scan_dataset(photos, cache_dir=cache)
    assert "unreadable (Permission denied)" in locked.splits["train"].digests
    monkeypatch.setattr(data_key, "file_sha256", readable_hash)  # a chmod: same size and mtime
    readable = scan_dataset(photos, cache_dir=cache)
    assert any("hashed 1 new or changed files" in notice for notice in readable.notices)
    assert cache_key(readable, 32, 10**8) != cache_key(locked, 32, 10**8)


def test_a_damaged_cache_is_rebuilt_with_a_message(photos, tmp_path):
    cache = str(tmp_path / "cache")
    first = prepare(photos, 32, cache, workers=1, log=lambda m: None)
    expected = first.splits["train"].images.clone()
    with open(os.path.join(first.folder, "train.npy"), "r+b") as f:
        f.truncate(1000)
    messages = []
    again = prepare(photos, 32, cache, workers=1, log=messages.append)
    assert any("damaged" in m and "rebuilding" in m for m in messages)
    assert torch.equal(again.splits["train"].images, expected)


def test_missing_val_folder_gives_an_announced_stratified_split(tmp_path):
    data_dir = write_digits_dataset(str(tmp_path / "data"), ["zero", "one"], {"train": 10}, test=0)
    messages = []
    data = prepare(data_dir, 16, str(tmp_path / "cache"), workers=1, log=messages.append,
                   scanned=scan_dataset(data_dir, 0.2, 1, cache_dir=str(tmp_path / "cache")))
    assert any("holding out 20%" in m for m in messages)
    assert data.splits["val"].labels.tolist() == [0, 0, 1, 1]
    assert len(set(data.splits["train"].files) & set(data.splits["val"].files)) == 0


def test_images_decode_upright_and_resized(tmp_path):
    path = str(tmp_path / "tall.png")
    pixels = np.zeros((100, 40, 3), np.uint8)
    pixels[:50] = 255  # top half white
    Image.fromarray(pixels).save(path)
    array = load_image(path, 20)
    assert array.shape == (3, 20, 20)
    # The center crop of a 40x100 image keeps rows 30..70 of the original: top half white.
    assert array[:, :8].min() > 200 and array[:, 12:].max() < 50


def test_an_image_outside_class_folders_and_a_class_left_empty_by_skipping_are_reported(tmp_path):
    from kdistill.errors import KdistillError

    data_dir = write_digits_dataset(str(tmp_path / "data"), ["zero", "one"], {"train": 3, "val": 2}, test=0)
    stray = os.path.join(data_dir, "train", "stray.png")
    os.link(os.path.join(data_dir, "train", "zero", sorted(os.listdir(os.path.join(data_dir, "train", "zero")))[0]),
            stray)
    with pytest.raises(KdistillError, match="stray.png: not inside a class folder"):
        prepare(data_dir, 16, str(tmp_path / "cache"), workers=1, log=lambda m: None)
    for name in os.listdir(os.path.join(data_dir, "train", "one")):
        with open(os.path.join(data_dir, "train", "one", name), "wb") as f:
            f.write(b"broken")
    with pytest.raises(KdistillError, match="class 'one' has no usable training image"):
        prepare(data_dir, 16, str(tmp_path / "cache"), workers=1, skip_bad=True, log=lambda m: None)
