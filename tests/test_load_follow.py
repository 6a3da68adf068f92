"""Threads under auto follow the load while a model trains (kdistill/load_follow.py): one thread per
core other processes leave free, back to the start's count after the fit; a fixed count stays fixed."""
import types

import pytest
import torch

import kdistill
from conftest import tiny_settings
from kdistill import load_follow
from kdistill.compute import ONE_PROCESS, Ranks

CPU = torch.device("cpu")


class FakeWindow:
    """Two CPUs; each read reports the next of `loads` after WATCH_SECONDS (None: no /proc/stat)."""
    loads: list = []

    def __init__(self):
        self.cpus = {0, 1}

    def seconds(self):
        return load_follow.WATCH_SECONDS

    def others(self):
        return FakeWindow.loads.pop(0) if FakeWindow.loads else 0.0


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_the_count_drops_while_others_keep_a_core_busy_and_returns_after(monkeypatch, two_threads):
    monkeypatch.setattr(load_follow, "LoadWindow", FakeWindow)
    FakeWindow.loads = [1.2, 1.0, 0.1, 0.3]
    lines = []
    state = types.SimpleNamespace(session=types.SimpleNamespace(log=lines.append, name="student"))
    follower = load_follow.ThreadsFollowLoad(quota=None)
    follower.on_fit_start(state)
    counts = []
    for batch in range(1, 5):
        follower.on_batch_end(state, batch)
        counts.append(torch.get_num_threads())
    assert counts == [1, 1, 2, 2]
    assert lines == ["student: threads 2 -> 1 (other processes kept 1.2 of the 2 cores this process may use busy "
                     "over the last 5 s; threads auto follows the load)",
                     "student: threads 1 -> 2 (other processes kept 0.1 of the 2 cores this process may use busy "
                     "over the last 5 s; threads auto follows the load)"]
    FakeWindow.loads = [2.0]
    follower.on_batch_end(state, 5)
    assert torch.get_num_threads() == 1
    follower.close(state)
    assert torch.get_num_threads() == 2  # the run's count again for what follows the fit


def test_a_window_shorter_than_the_watch_is_not_read(monkeypatch, two_threads):
    class Young(FakeWindow):
        def seconds(self):
            return load_follow.WATCH_SECONDS / 2
    monkeypatch.setattr(load_follow, "LoadWindow", Young)
    FakeWindow.loads = [2.0]
    state = types.SimpleNamespace(session=types.SimpleNamespace(log=print, name="student"))
    follower = load_follow.ThreadsFollowLoad(quota=None)
    follower.on_fit_start(state)
    follower.on_batch_end(state, 1)
    assert torch.get_num_threads() == 2 and FakeWindow.loads == [2.0]


def test_only_threads_auto_on_one_cpu_process_follows(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert [type(c) for c in load_follow.threads_following_load(0, CPU, ONE_PROCESS)] == [load_follow.ThreadsFollowLoad]
    assert load_follow.threads_following_load(2, CPU, ONE_PROCESS) == []  # a count the user fixed
    assert load_follow.threads_following_load(0, torch.device("cuda"), ONE_PROCESS) == []
    assert load_follow.threads_following_load(0, CPU, Ranks(rank=0, world_size=2, local_rank=0)) == []
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert load_follow.threads_following_load(0, CPU, ONE_PROCESS) == []


def test_a_run_under_auto_follows_a_load_and_ends_with_its_start_count(digits_dataset, tmp_path, monkeypatch,
                                                                     two_threads):
    """Every model of a run: the fit's batches reach the follower, which logs each change."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(load_follow, "LoadWindow", FakeWindow)
    monkeypatch.setattr(kdistill.threads, "others_busy_cores", lambda seconds=0.5: 0.0)  # a quiet start
    monkeypatch.setattr(kdistill.threads, "_affinity", lambda: {0, 1})
    FakeWindow.loads = [2.0] * 1000
    lines = []
    kdistill.run(tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache"), threads=0),
                 log=lines.append)
    assert "threads: 2 (one per core this process may use)" in lines
    for name in ("teacher", "student", "baseline"):
        assert any(line.startswith(f"{name}: threads 2 -> 1 (other processes kept 2.0") for line in lines), name
    assert torch.get_num_threads() == 2
