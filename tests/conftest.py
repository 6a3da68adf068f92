import os

# Under pytest-xdist (the README's `-n auto`) each worker process takes one core: one torch thread
# each, for the tests' own models and the runs they start as subprocesses. Two threads per worker
# on a machine with as many cores as workers would contend and slow every test down.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"

# Every test process gets a data cache of its own, removed at its exit: tests never write to the
# user's cache, and test processes never share one (tests that need their own set cache_dir).
import atexit  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

os.environ["KDISTILL_CACHE"] = tempfile.mkdtemp(prefix="kdistill-test-cache-")
atexit.register(shutil.rmtree, os.environ["KDISTILL_CACHE"], True)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def write_digits_dataset(target: str, classes: list[str], per_class: dict[str, int], test: int,
                         pixels: int = 16) -> str:
    """A small dataset in the seed layout of real handwritten digits (scikit-learn's bundled 8x8
    digits, no download), upscaled to `pixels` px grayscale PNGs.

    classes are digit names ("zero", "one", ...); each class takes its first images for train,
    the next for val (per_class, e.g. {"train": 24, "val": 8}); `test` further images of those
    classes, taken in turn, go unlabelled into DATA/test/.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    unused = {name: np.flatnonzero(digits.target == DIGIT_NAMES.index(name)).tolist() for name in classes}

    def save(index: int, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        values = (digits.images[index] * (255.0 / 16.0)).round().astype(np.uint8)
        image = Image.fromarray(values).resize((pixels, pixels), Image.BILINEAR)  # uint8 2-D: grayscale
        image.save(os.path.join(folder, f"digit-{index:04d}.png"))

    for split, count in per_class.items():
        for name in classes:
            for index in unused[name][:count]:
                save(index, os.path.join(target, split, name))
            unused[name] = unused[name][count:]
    for position in range(test):
        name = classes[position % len(classes)]
        save(unused[name].pop(0), os.path.join(target, "test"))
    return target


@pytest.fixture(scope="session")
def digits_dataset(tmp_path_factory):
    """3 digit classes (zero, one, two), 24 train + 8 val images each, 10 unlabelled test images."""
    return write_digits_dataset(str(tmp_path_factory.mktemp("digits") / "data"), ["zero", "one", "two"],
                                {"train": 24, "val": 8}, test=10)


def tiny_settings(data: str, out: str, cache: str, **extra) -> dict:
    """Settings for a run that takes seconds: 16 px, few epochs, small batches; float32, so numbers
    recomputed by hand compare exactly on any CPU (bf16 runs are tested on their own). No int8
    export and latency table (tests/test_deploy.py turns it on): it would add seconds to every run."""
    settings = {
        "data": data, "out": out, "cache_dir": cache, "image_size": 16, "seed": 0, "device": "cpu",
        "precision": "fp32", "workers": 1, "deploy_check": False,
        "teacher": {"arch": "resnet18", "weights": "none", "mode": "full", "epochs": 2, "batch_size": 16},
        "student": {"arch": "resnet18", "weights": "none", "epochs": 3, "batch_size": 16, "lr_step": 2},
        "distill": {"method": "kd", "temperature": 4.0, "alpha": 0.7},
    }
    for key, value in extra.items():
        if isinstance(value, dict):
            settings[key].update(value)
        else:
            settings[key] = value
    return settings


# Runs in a subprocess find the tiny networks (tests/tiny_nets.py) as module:callable architectures.
ENVIRONMENT = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))


def start_and_signal_after_first_student_epoch(command: list[str], out: str, signal_number: int,
                                               **popen) -> subprocess.Popen:
    """Starts the command and sends it the signal once the student's first checkpoint is on disk; tiny
    networks then hold still (tiny_nets.hold_while_asked) until the signal arrives.

    SIGINT is reset to its default in the run: a suite started in the background (`nohup ... &`)
    inherits it ignored, and the run would then finish instead of stopping."""
    checkpoint = os.path.join(out, "checkpoints", "student", "last.pt")
    process = subprocess.Popen(command, env=dict(ENVIRONMENT, TINY_NETS_HOLD_WHEN=checkpoint),
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **popen)
    deadline = time.time() + 300
    while not os.path.exists(checkpoint) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal_number)
    return process
