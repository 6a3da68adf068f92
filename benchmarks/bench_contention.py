"""Training speed on the CPU while another process competes for the cores, side by side.

One training step (forward, backward, SGD step) of --model at --size px, batch --batch, in float32
+ channels_last and in bfloat16 autocast + channels_last, each in a fresh process (OpenMP reads
its wait policy once, at start) under each condition:

  threads=all         torch's default: one thread per core this process may use
  threads=all passive the same with OMP_WAIT_POLICY=PASSIVE (waiting threads sleep, not spin)
  threads=cores-1     one thread fewer than the cores
  kdistill auto       what a kdistill run chooses at its start (kdistill/threads.py: one per core
                      others leave free)
  kdistill follows    the same, then following the load while it trains (kdistill/load_follow.py)

quiet and with a competitor running beside it: --competitor-threads threads of matrix products in
--competitor-dtype (another training, a compile, a browser: any process that keeps cores busy). Each cell is
the median of --repeats steps after two warm-up steps; the competitor starts before the warm-up, or
with --late after it (a process that starts while a run trains): the steps then run for --seconds and
the cell is the median of those after the first watch window plus 2 s.

    python benchmarks/bench_contention.py --model resnet18 --size 112 --batch 32
    python benchmarks/bench_contention.py --late --only "kdistill auto" "kdistill follows"
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

CONDITIONS = {"threads=all": {}, "threads=all passive": {"OMP_WAIT_POLICY": "PASSIVE"},
              "threads=cores-1": {"KDISTILL_BENCH_THREADS": "-1"}, "kdistill auto": {"KDISTILL_BENCH_THREADS": "auto"},
              "kdistill follows": {"KDISTILL_BENCH_THREADS": "follow"}}
PRECISIONS = ("fp32", "bf16")

COMPETITOR = """
import torch, time
torch.set_num_threads({threads})
a = torch.randn(1024, 1024, dtype=torch.{dtype})
end = time.time() + {seconds}
while time.time() < end:
    a = torch.tanh(a @ a / 1024)
"""


def _threads() -> list:
    """Sets the child's threads as its condition says; the load follower where it follows (else none)."""
    import torch
    cores, how = len(os.sched_getaffinity(0)), os.environ.get("KDISTILL_BENCH_THREADS")
    if how == "-1":
        torch.set_num_threads(max(1, cores - 1))
    elif how in ("auto", "follow"):
        from kdistill.threads import choose_threads
        threads, why = choose_threads(0, None)
        torch.set_num_threads(threads)
        print(f"kdistill auto: {threads} thread(s) ({why})", file=sys.stderr)
    if how != "follow":
        return []
    import types

    from kdistill.load_follow import ThreadsFollowLoad
    from kdistill.threads import quota_cores
    state = types.SimpleNamespace(session=types.SimpleNamespace(log=lambda line: print(line, file=sys.stderr),
                                                                name="kdistill follows"))
    follower = ThreadsFollowLoad(quota_cores())
    follower.on_fit_start(state)
    return [lambda: follower.on_batch_end(state, 0)]


def step_times(model_name: str, size: int, batch: int, precision: str, repeats: int, seconds: float) -> list[float]:
    """Seconds per step: `repeats` steps after two warm-up ones, or with `seconds` those of the steps
    that start after the first watch window plus 2 s of that many seconds of steps."""
    import torch
    import torch.nn.functional as F
    import torchvision

    from kdistill.load_follow import WATCH_SECONDS
    watchers = _threads()
    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(num_classes=10).to(memory_format=torch.channels_last)
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times, step, ready = [], 0, float("inf")
    while step < repeats + 2 if not seconds else time.perf_counter() < ready + seconds:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for watch in watchers:
            watch()
        step += 1
        if step == 2:  # warmed up: a late competitor starts now
            ready = time.perf_counter()
            print("ready", flush=True)
        elif step > 2 and (not seconds or start > ready + WATCH_SECONDS + 2):
            times.append(time.perf_counter() - start)
    return times


def measure(args, precision: str, extra_env: dict[str, str], loaded: bool) -> float:
    def start_competitor():
        code = COMPETITOR.format(threads=args.competitor_threads, seconds=600, dtype=args.competitor_dtype)
        return subprocess.Popen([sys.executable, "-c", code])
    competitor = start_competitor() if loaded and not args.late else None
    if competitor:
        time.sleep(2)  # let it reach its loop
    try:
        child = subprocess.Popen([sys.executable, __file__, "--child", precision, "--model", args.model, "--size",
                                  str(args.size), "--batch", str(args.batch), "--repeats", str(args.repeats),
                                  "--seconds", str(args.seconds if args.late else 0)],
                                 env={**os.environ, **extra_env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        if child.stdout.readline().strip() == "ready" and loaded and args.late:
            competitor = start_competitor()
        out, err = child.communicate()
        if child.returncode:
            raise SystemExit(f"the child failed: {err.strip().splitlines()[-1:]}")
        for line in err.splitlines():
            if line.startswith("kdistill"):
                print(f"  ({precision}, {'loaded' if loaded else 'quiet'}) {line}", flush=True)
    finally:
        if competitor:
            competitor.kill()
            competitor.wait()
    times = sorted(json.loads(out.strip().splitlines()[-1]))
    return args.batch / times[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", nargs="*", choices=list(CONDITIONS), help="conditions to measure (default: all)")
    parser.add_argument("--competitor-threads", type=int, default=2)
    parser.add_argument("--competitor-dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--late", action="store_true", help="the competitor starts after the warm-up steps")
    parser.add_argument("--seconds", type=float, default=40.0, help="with --late: how long the steps run")
    parser.add_argument("--child", choices=PRECISIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(step_times(args.model, args.size, args.batch, args.child, args.repeats, args.seconds)))
        return
    print(f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores; {args.model} "
          f"step, {args.size} px, batch {args.batch}, channels_last; competitor: {args.competitor_threads} threads "
          f"of {args.competitor_dtype} matrix products, starting {'after' if args.late else 'before'} the warm-up")
    print("| condition | fp32 quiet | fp32 loaded | fp32 slowdown | bf16 quiet | bf16 loaded | bf16 slowdown |")
    print("|---|---|---|---|---|---|---|")
    for name, env in CONDITIONS.items():
        if args.only and name not in args.only:
            continue
        cells = []
        for precision in PRECISIONS:
            quiet, loaded = measure(args, precision, env, False), measure(args, precision, env, True)
            cells += [f"{quiet:.1f} img/s", f"{loaded:.1f} img/s", f"{quiet / loaded:.2f}x"]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
