"""The file-hash index (kdistill/data_key.py) must never serve an old hash for changed bytes, even
when an edit keeps the file's size and has its modification time set back (issue 25, item 9)."""
import io
import json
import os

import numpy as np
from PIL import Image, PngImagePlugin

from conftest import write_digits_dataset
from kdistill.data import prepare, scan_dataset
from kdistill.data_key import INDEX_FOLDER, cache_key


def png_bytes(pixels: np.ndarray, padding: int = 0) -> bytes:
    """A PNG of these gray pixels, grown by exactly 16 + padding bytes by a tEXt chunk when padding
    is given (12 bytes of chunk framing, the keyword "pad" and its NUL separator, then the text)."""
    info = None
    if padding:
        info = PngImagePlugin.PngInfo()
        info.add_text("pad", "x" * padding)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def rewrite_same_size_same_mtime(path: str) -> None:
    """Give the PNG at path other pixels in exactly as many bytes, then set its mtime back."""
    before = os.stat(path)
    with Image.open(path) as image:
        old = np.asarray(image)
    new = (255 - old) // 2  # other pixels, and smoother: they compress smaller than the original
    plain = png_bytes(new)
    padding = before.st_size - len(plain) - 16
    assert padding > 0, "the rewritten image must compress smaller to be padded to the same size"
    edited = png_bytes(new, padding)
    assert len(edited) == before.st_size
    with open(path, "r+b") as f:  # in place, as an editor that keeps the file does
        f.write(edited)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_a_same_size_edit_with_its_mtime_restored_gets_a_new_key_and_cache(tmp_path):
    data_dir = write_digits_dataset(str(tmp_path / "data"), ["zero", "one"], {"train": 4, "val": 2}, test=0)
    cache = str(tmp_path / "cache")
    first = prepare(data_dir, 16, cache, workers=1, log=lambda m: None)
    victim_name = first.splits["train"].files[0]
    victim = os.path.join(data_dir, "train", victim_name)
    old_pixels = first.splits["train"].images[0].clone()

    rewrite_same_size_same_mtime(victim)
    messages = []
    second = prepare(data_dir, 16, cache, workers=1, log=messages.append)
    assert any("hashed 1 new or changed files" in m for m in messages), messages
    assert second.key != first.key and second.folder != first.folder
    assert any("decoded" in m for m in messages) and not any("reusing" in m for m in messages)
    index = second.splits["train"].files.index(victim_name)
    assert not np.array_equal(second.splits["train"].images[index].numpy(), old_pixels.numpy())
    # Unchanged since: the index serves every hash again, and the new entry is reused.
    messages.clear()
    third = prepare(data_dir, 16, cache, workers=1, log=messages.append)
    assert third.key == second.key and not any("hashed" in m for m in messages)
    assert any("reusing the data cache" in m for m in messages)


def test_index_entries_written_before_the_change_are_hashed_again_not_trusted(tmp_path):
    data_dir = write_digits_dataset(str(tmp_path / "data"), ["zero", "one"], {"train": 3, "val": 2}, test=0)
    cache = str(tmp_path / "cache")
    truth = cache_key(scan_dataset(data_dir), 16, 10**8)  # no index: every file read
    scan_dataset(data_dir, cache_dir=cache)
    # The former layout, [size, mtime_ns, sha256]: size and mtime as now, hashes wrong for every file.
    index_folder = os.path.join(cache, INDEX_FOLDER)
    for index_name in os.listdir(index_folder):
        path = os.path.join(index_folder, index_name)
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({name: [entry[0], entry[1], "0" * 64] for name, entry in entries.items()}, f)
    again = scan_dataset(data_dir, cache_dir=cache)
    assert any("hashed 10 new or changed files" in notice for notice in again.notices), again.notices
    assert cache_key(again, 16, 10**8) == truth
