"""Several processes (DDP, as torchrun starts them) on the CPU with gloo: one process's numbers,
a resume after a killed process, a clear stop when one dies or hangs, and rank 0 alone writing
the run folder. Each process is tests/ddp_worker.py on one thread, given torchrun's environment.

The runs train ddp_worker:small_cnn (with BatchNorm, synchronized): two processes add the same
numbers in another order (each its share, then gloo's sum), which changes float32 results in their
last bits: relative differences of a few 1e-7 here. A ResNet18 amplifies such differences into
other results within a few steps, from one process to two as from one thread to two in a single
process (measured), so comparing whole runs needs a network that does not.
"""
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml

import kdistill
from conftest import ROOT, tiny_settings, write_digits_dataset
from fault.kill_resume import comparable
from kdistill import compute, pipeline
from kdistill.cli import main
from kdistill.errors import KdistillError
from kdistill.batches import share
from kdistill.train import load_checkpoint

TESTS = os.path.join(ROOT, "tests")
WORKER = os.path.join(TESTS, "ddp_worker.py")
TOLERANCE = 1e-6  # relative and absolute: float32 rounding of sums taken in another order (see above)
WAIT = 600  # seconds a run may take on a busy machine


def write_settings(path: str, **extra) -> str:
    settings = tiny_settings("", "", os.path.join(os.path.dirname(path), "cache"), baseline=False,
                             ddp_timeout_s=120, **extra)
    del settings["data"], settings["out"]
    with open(path, "w") as f:
        yaml.safe_dump(settings, f)
    return path


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory):
    """25 training and 9 val images per class: the last training batch of 16 (11 images) and the
    last val batch split 5/6 between two processes, so unequal shares are exercised too. The
    settings: flipped views (drawn fresh for the teacher, stored with the teacher's logits for the
    student), and the student's weight average."""
    base = tmp_path_factory.mktemp("ddp")
    data = write_digits_dataset(str(base / "data"), ["zero", "one", "two"], {"train": 25, "val": 9}, test=4)
    config = write_settings(str(base / "settings.yaml"), augment="flip",
                            teacher={"arch": "ddp_worker:small_cnn", "epochs": 2},
                            student={"arch": "ddp_worker:small_cnn", "epochs": 3, "ema": 0.5})
    return data, config, base


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TwoProcesses:
    """Two `kdistill run` processes with torchrun's environment, each one's output collected as it comes."""

    def __init__(self, data: str, config: str, out: str, args_of_rank: dict | None = None,
                 env_of_rank: dict | None = None):
        port = free_port()
        self.out = out
        self.outputs = [[], []]
        self.processes = []
        for rank in range(2):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=ROOT,
                       PYTHONUNBUFFERED="1", **(env_of_rank or {}).get(rank, {}))
            command = [sys.executable, WORKER, f"{out}-writes-{rank}.json", "run", "--data", data, "--out", out,
                       "--config", config, *(args_of_rank or {}).get(rank, [])]
            process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            threading.Thread(target=self._read, args=(process, self.outputs[rank]), daemon=True).start()
            self.processes.append(process)

    @staticmethod
    def _read(process, lines):
        for line in process.stdout:
            lines.append(line)

    def wait_for(self, rank: int, text: str) -> None:
        deadline = time.monotonic() + WAIT
        while not any(text in line for line in self.outputs[rank]):
            assert self.processes[rank].poll() is None, self.output(rank)
            assert time.monotonic() < deadline, f"no {text!r} from rank {rank}"
            time.sleep(0.05)

    def wait(self, rank: int) -> int:
        code = self.processes[rank].wait(WAIT)
        time.sleep(0.2)  # the reader takes the last lines
        return code

    def output(self, rank: int) -> str:
        return "".join(self.outputs[rank])

    def writes(self, rank: int) -> list[str]:
        with open(f"{self.out}-writes-{rank}.json") as f:
            return json.load(f)


def history(out: str, name: str) -> list[dict]:
    with open(os.path.join(out, "history", f"{name}.csv")) as f:
        return [{key: value if key == "best_source" else float(value) for key, value in row.items()}
                for row in csv.DictReader(f)]


def listing(out: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(folder, name), out)
                  for folder, _, names in os.walk(out) for name in names)


def error_line(output: str) -> str:
    """The one line kdistill printed for the error, after checking it printed no traceback."""
    assert "Traceback" not in output, output
    [line] = [line for line in output.splitlines() if line.startswith("kdistill: error:")]
    return line


def one_and_two(data: str, config: str, one: str, two: str) -> TwoProcesses:
    """The same run in one process (here, on one thread) and in two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["run", "--data", data, "--out", one, "--config", config]) == 0
    finally:
        torch.set_num_threads(threads)
    ranks = TwoProcesses(data, config, two)
    assert [ranks.wait(0), ranks.wait(1)] == [0, 0], ranks.output(0) + ranks.output(1)
    return ranks


def assert_same_histories(one: str, two: str, epochs: dict[str, int]) -> None:
    for name, count in epochs.items():
        alone, shared = history(one, name), history(two, name)
        assert [row["epoch"] for row in shared] == list(range(1, count + 1))
        for row_alone, row_shared in zip(alone, shared, strict=True):
            assert set(row_shared) == set(row_alone)
            assert row_shared.get("best_source") == row_alone.get("best_source")
            for key in row_alone.keys() - {"seconds", "best_source"}:
                assert row_shared[key] == pytest.approx(row_alone[key], rel=TOLERANCE, abs=TOLERANCE), (
                    name, row_alone["epoch"], key)


@pytest.fixture(scope="module")
def runs(ddp_data):
    data, config, base = ddp_data
    one, two = str(base / "one"), str(base / "two")
    return one, two, one_and_two(data, config, one, two)


def test_two_processes_give_the_numbers_of_one_with_the_same_global_batch(runs):
    one, two, _ = runs
    assert_same_histories(one, two, {"teacher": 2, "student": 3})
    with open(os.path.join(one, "metrics.json")) as f, open(os.path.join(two, "metrics.json")) as g:
        alone, shared = json.load(f)["models"], json.load(g)["models"]
    for name in ("teacher", "student"):
        assert shared[name]["best_epoch"] == alone[name]["best_epoch"]
        assert shared[name]["best_val_acc"] == pytest.approx(alone[name]["best_val_acc"], abs=TOLERANCE)
    with open(os.path.join(one, "predictions.csv")) as f, open(os.path.join(two, "predictions.csv")) as g:
        assert [row["label"] for row in csv.DictReader(f)] == [row["label"] for row in csv.DictReader(g)]


def test_a_method_with_trainable_parts_and_an_online_teacher_gives_the_numbers_of_one_process(ddp_data):
    """FitNets: its regressor (with a BatchNorm of its own) trains beside the student, under DDP
    too; the teacher runs on each process's share and gives its features."""
    data, _, base = ddp_data
    config = write_settings(str(base / "fitnets.yaml"),
                            teacher={"arch": "ddp_worker:small_cnn", "epochs": 1},
                            student={"arch": "ddp_worker:small_cnn", "epochs": 2},
                            distill={"method": "fitnets", "fitnets": {"student_layer": "4", "teacher_layer": "4"}})
    one, two = str(base / "fitnets-one"), str(base / "fitnets-two")
    one_and_two(data, config, one, two)
    assert history(two, "student")[0]["train_hint"] > 0
    assert_same_histories(one, two, {"teacher": 1, "student": 2})


def test_only_rank_0_writes_the_run_folder(runs):
    one, two, ranks = runs
    assert any(write.endswith("config.yaml") for write in ranks.writes(0))  # the audit sees writes
    assert ranks.writes(1) == []
    assert ranks.output(1).strip() == ""  # it logs nothing either
    assert listing(two) == listing(one)
    with open(os.path.join(two, "log.txt")) as f:
        lines = f.read().splitlines()
    assert sum(line[20:].startswith("student epoch 1/3") for line in lines) == 1  # after the date and time


def test_a_killed_process_stops_the_other_and_the_run_resumes_to_the_same_numbers(ddp_data, runs):
    data, config, base = ddp_data
    out = str(base / "killed")
    # Process 1 holds still once the first student checkpoint exists (ddp_worker.HoldWhileAsked), so
    # the kill lands mid-training however loaded the machine is; process 0 then waits on it.
    ranks = TwoProcesses(data, config, out, env_of_rank={
        1: {"TINY_NETS_HOLD_WHEN": os.path.join(out, "checkpoints", "student", "last.pt")}})
    ranks.wait_for(0, "student epoch 1/3")
    ranks.processes[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    assert ranks.wait(0) == 2
    assert time.monotonic() - killed < 60  # a closed connection is noticed at once, not after ddp_timeout_s
    assert "process 0 of 2: another process stopped" in error_line(ranks.output(0))
    assert load_checkpoint(os.path.join(out, "checkpoints", "student", "last.pt"), print)["epoch"] >= 1
    # Resumed by kdistill's own launcher (torchrun) with the same command.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([TESTS, ROOT]))
    resumed = subprocess.run([sys.executable, "-m", "kdistill", "run", "--nproc", "2", "--data", data, "--out", out,
                              "--config", config], env=env, capture_output=True, text=True, timeout=WAIT)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "student: resuming after epoch" in resumed.stdout
    assert comparable(out) == comparable(runs[1])


def test_a_run_of_two_processes_resumes_with_two_only(ddp_data, runs, tmp_path, capsys):
    data, config, _ = ddp_data
    out = str(tmp_path / "copy")
    shutil.copytree(runs[1], out)
    assert main(["run", "--data", data, "--out", out, "--config", config]) == 2
    line = error_line(capsys.readouterr().err)
    assert "teacher: the checkpoint in" in line
    assert "was trained on cpu in fp32 by 2 process(es), this run uses cpu in fp32 by 1 process(es)" in line


def test_a_process_that_exits_early_stops_the_other_within_the_timeout(ddp_data, tmp_path):
    data, config, _ = ddp_data
    ranks = TwoProcesses(data, config, str(tmp_path / "run"), {0: ["--set", "ddp_timeout_s=3"],
                                                        1: ["--set", "ddp_timeout_s=0"]})
    started = time.monotonic()
    assert ranks.wait(1) == 2
    assert "setting ddp_timeout_s must be >= 1" in error_line(ranks.output(1))
    assert ranks.wait(0) == 2
    assert time.monotonic() - started < 3 + 60
    assert "process 0 of 2: the processes did not all join within ddp_timeout_s=3 s" in error_line(ranks.output(0))


def test_a_process_that_hangs_stops_the_other_within_the_timeout(ddp_data, tmp_path):
    data, config, _ = ddp_data
    ranks = TwoProcesses(data, config, str(tmp_path / "run"), {rank: ["--set", "ddp_timeout_s=3"] for rank in range(2)})
    try:
        ranks.wait_for(0, "teacher: ")
        ranks.processes[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        assert ranks.wait(0) == 2, ranks.output(0)[-3000:]
        assert time.monotonic() - stopped < 3 + 60
        assert "did not answer within ddp_timeout_s=3 s" in error_line(ranks.output(0))
    finally:
        ranks.processes[1].kill()
        ranks.processes[1].wait()


def test_shares_of_a_batch_cover_it_once_as_evenly_as_whole_samples_allow():
    for count in (0, 1, 5, 11, 16):
        for processes in (1, 2, 3, 4):
            parts = [list(range(count))[share(count, (rank, processes))] for rank in range(processes)]
            assert sum(parts, []) == list(range(count))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_a_global_batch_that_does_not_divide_among_the_processes_is_refused(digits_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "join_ranks", lambda *args: (compute.Ranks(0, 3, 0), torch.device("cpu")))
    monkeypatch.setattr(pipeline, "check_same_experiment", lambda *args: None)  # three ranks without a group
    settings = tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache"))
    with pytest.raises(KdistillError, match=r"setting teacher.batch_size \(16\) is the global batch: it must divide "
                                            r"evenly among the 3 processes"):
        kdistill.run(settings, log=lambda message: None)
    assert not os.path.exists(tmp_path / "run")  # refused before anything was written


def test_torchrun_environment_is_checked_before_joining(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(KdistillError, match="RANK or LOCAL_RANK is not set"):
        compute.join_ranks("cpu", 5, True)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    for device in ("cuda:1", "mps"):
        with pytest.raises(KdistillError, match="each uses the GPU cuda:LOCAL_RANK"):
            compute.join_ranks(device, 5, True)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert main(["run", "--data", "d", "--out", "o", "--nproc", "3"]) == 2
    assert "--nproc is 3 but torchrun started 2 processes on this machine" in capsys.readouterr().err


def test_a_timeout_raised_inside_torch_distributed_counts_as_a_lost_process():
    """gloo's timeout in DDP's first broadcast says only "Application timeout caused pair closure":
    it must still become the one-line error of a lost process, not a traceback."""
    message = "Application timeout caused pair closure"
    namespace = {}
    exec(compile(f"def broadcast():\n    raise RuntimeError({message!r})\n",
                 os.path.join(os.path.dirname(torch.distributed.__file__), "utils.py"), "exec"), namespace)
    with pytest.raises(RuntimeError) as inside:
        namespace["broadcast"]()
    assert compute.lost_process(inside.value)
    with pytest.raises(RuntimeError) as outside:
        raise RuntimeError(message)
    assert not compute.lost_process(outside.value)  # kdistill's own errors stay what they are
    assert compute.lost_process(RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed"))
    assert not compute.lost_process(ValueError("/gloo/"))
