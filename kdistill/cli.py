"""Command line: kdistill run | sweep | demo | predict | evaluate | export | compare | config | cache | clean.

Errors the user can fix print one line, no traceback."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from importlib.metadata import version

from .errors import KdistillError, printable
from .preset_names import preset_names

EPILOG = """examples:
  kdistill demo --out runs/demo
  kdistill run --data DATA --out runs/exp1 --preset seed-nguyen
  kdistill run --data DATA --out runs/exp2 --preset seed-shen --set image_size=128 --set student.epochs=20
  kdistill run --data DATA --out runs/exp3 --config my.yaml
  kdistill run --data DATA --out runs/exp4 --preset seed-nguyen --seeds 0,1,2
  kdistill sweep --data DATA --out runs/sweep1 --preset seed-nguyen --grid distill.temperature=1,2,4,8 \
      --grid distill.alpha=0.25,0.5,0.9
  kdistill run --data DATA --out runs/exp5 --preset seed-nguyen --nproc 4
  kdistill predict --run runs/exp1 --data more_photos/
  kdistill compare --run runs/exp1 --run runs/exp2 --html compare.html
  kdistill predict --run runs/exp1/student-int8.onnx --data more_photos/
  kdistill export --run runs/exp1
  kdistill config --preset seed-nguyen > my.yaml
  kdistill cache --list

Any setting can be changed with --set section.key=value; `kdistill config` lists them all, described.
Run again with the same --out to resume an interrupted run."""


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=preset_names(), help="a built-in recipe")
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML file of settings (repeatable; later files win)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                        help="override one setting, e.g. --set distill.temperature=4 (repeatable)")
    parser.add_argument("--seed", type=int, help="random seed; the same seed repeats a run on the same machine")
    parser.add_argument("--seeds", metavar="S1,S2,...",
                        help="train the student and the baseline once per seed (one teacher) and report "
                             "mean ± std and McNemar's paired test, e.g. --seeds 0,1,2")
    parser.add_argument("--epochs", type=int, help="the student's epochs (student.epochs; the teacher's: --set "
                                                   "teacher.epochs=N)")
    parser.add_argument("--image-size", type=int, help="side in pixels images are resized to (image_size)")
    parser.add_argument("--batch-size", type=int, help="the student's batch size (student.batch_size)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present)")
    parser.add_argument("--skip-bad", action="store_true", help="skip unreadable images with a warning")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep every model's whole training state once it finished (to train on later)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="don't train the comparison student without a teacher")


def _add_force_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="write into an existing, non-empty --out that kdistill did not create (its files with "
                             "kdistill's names are replaced)")


def _add_print_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved settings (a valid --config file) and exit without running")


def _overrides(args: argparse.Namespace, **fixed) -> dict:
    overrides = {key: value for key, value in fixed.items() if value is not None}
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.seeds is not None:
        overrides["seeds"] = args.seeds  # text such as 0,1,2, read as the setting's list
    if args.image_size is not None:
        overrides["image_size"] = args.image_size
    student = {key: value for key, value in (("epochs", args.epochs), ("batch_size", args.batch_size))
               if value is not None}
    if student:
        overrides["student"] = student
    if args.device:
        overrides["device"] = args.device
    if args.skip_bad:
        overrides["skip_bad"] = True
    if args.keep_checkpoints:
        overrides["keep_checkpoints"] = True
    if args.no_baseline:
        overrides["baseline"] = False
    return overrides


def _add_run(commands) -> None:
    run = commands.add_parser("run", help="prepare data, train teacher, student and baseline, report, predict, export",
                              description="From DATA/train/<class>/, DATA/val/<class>/ (optional) and DATA/test/ "
                                          "(optional) to a distilled student, a report and predictions in OUT.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Not required here: a --config file may name them (a saved OUT/config.yaml does).
    run.add_argument("--data", help="image folder in the layout train/<class>/, val/<class>/, test/")
    run.add_argument("--out", help="run folder; rerun with the same folder to resume (default: the next free "
                                   "runs/runN)")
    run.add_argument("--nproc", type=int, metavar="N",
                     help="train with N processes on this machine, one per GPU (or on the CPU), through torchrun; "
                          "batch sizes stay global. Several machines: start torchrun yourself (docs/distributed.md)")
    _add_setting_flags(run)
    _add_force_flag(run)
    _add_print_config_flag(run)


def _add_sweep(commands) -> None:
    sweep = commands.add_parser(
        "sweep", help="one run per point of a grid of settings, sharing the data, teacher and baseline",
        description="Run every combination of the --grid values as its own run folder OUT/points/<values>; the "
                    "data is prepared once, and the teacher and the baseline are trained once for all points "
                    "that train them alike. Then OUT/sweep.md, sweep.json and sweep.png compare the points. "
                    "Rerun the same command to resume.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_argument("--data", help="image folder in the layout train/<class>/, val/<class>/, test/")
    sweep.add_argument("--out", required=True, help="sweep folder; rerun with the same folder to resume")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...", required=True,
                       help="a setting and its values, e.g. --grid distill.temperature=1,2,4 (repeatable: the "
                            "grid is every combination; a list setting's values in brackets: [0.08,1],[0.35,1])")
    _add_setting_flags(sweep)
    _add_force_flag(sweep)


def _add_demo_and_config(commands) -> None:
    demo = commands.add_parser("demo", help="run the whole pipeline on the built-in digits dataset (no download)")
    demo.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    _add_setting_flags(demo)
    _add_force_flag(demo)
    _add_print_config_flag(demo)
    config = commands.add_parser("config", help="print the resolved settings, each described, without running",
                                 description="Print the settings that run would use, as YAML with a comment "
                                             "describing each one; the output is a valid --config file.")
    config.add_argument("--data", default="", help="image folder (may be left out here)")
    config.add_argument("--out", default="", help="run folder (may be left out here)")
    _add_setting_flags(config)


def _add_student_reader_flags(command, verb: str) -> None:
    command.add_argument("--run", required=True,
                         help="a finished run folder (uses its student.pt), or a student file: student.pt, "
                              "student.onnx or student-int8.onnx (ONNX Runtime, on the CPU)")
    command.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    command.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: cuda when present)")
    command.add_argument("--trust-arch", action="store_true",
                         help=f"build an architecture outside torchvision, timm and kdistill.zoo named by the {verb} "
                              "(runs that module's code: only for files from people you trust)")


def _add_predict_and_evaluate(commands) -> None:
    predict = commands.add_parser("predict", help="label new images with a finished run's student")
    _add_student_reader_flags(predict, "bundle")
    # --images and --output: the names before the commands agreed on --data and --out (still accepted).
    predict.add_argument("--data", "--images", dest="images", metavar="FOLDER", required=True,
                         help="folder of images to label (searched recursively)")
    predict.add_argument("--out", "--output", dest="output", metavar="FILE",
                         help="CSV to write (default predictions-<folder name>.csv in the run folder, or beside the "
                              "student file --run names)")
    predict.add_argument("--top-k", type=int, default=1, metavar="K",
                         help="also write the next K-1 most probable classes and their probabilities (default 1)")
    predict.add_argument("--strict", action="store_true",
                         help="stop at the first file that is not a usable image (default: skip such files "
                              "with one warning)")
    evaluate = commands.add_parser(
        "evaluate", help="score a finished run's student (and teacher) on another labelled folder",
        description="Accuracy, top-k accuracy, per-class precision, recall and F1 and the confusion matrix of the "
                    "student, and of the run's teacher where its folder has one, on FOLDER/<class>/<images>.")
    _add_student_reader_flags(evaluate, "run")
    evaluate.add_argument("--data", metavar="FOLDER", required=True,
                          help="labelled folder: <class>/<images>, classes the student's")
    evaluate.add_argument("--out", "--output", dest="output", metavar="FILE",
                          help="JSON to write (default evaluate-<folder name>.json in the run folder)")
    evaluate.add_argument("--top-k", type=int, default=5, metavar="K", help="top-k accuracy's k (default 5)")


def _add_compare_export_cache(commands) -> None:
    compare = commands.add_parser("compare", help="finished runs side by side in one markdown table",
                                  description="One row per model (teacher, student, baseline) per run: the "
                                              "settings that differ between the runs, best val accuracy and its "
                                              "epoch (with seeds: mean ± std), parameters, size, GFLOPs, latency.")
    compare.add_argument("--run", action="append", default=[], dest="run_flags", metavar="RUN",
                         help="a finished run folder (holds metrics.json and config.yaml; repeatable)")
    compare.add_argument("runs", nargs="*", metavar="RUN", help="finished run folders given without --run")
    compare.add_argument("--html", metavar="FILE", help="also write the table as a self-contained HTML page")
    export = commands.add_parser(
        "export", help="write a finished run's student.onnx and student-int8.onnx and measure the deployment table",
        description="From RUN/student.pt: student.onnx (float32, dynamic batch, metadata with the classes, input "
                    "statistics and image size) and student-int8.onnx (static int8 quantization calibrated on "
                    "training images); then size, val accuracy and CPU latency (batch 1 and 32) of the student in "
                    "PyTorch and ONNX Runtime fp32 and int8, and of the teacher, into RUN/metrics.json "
                    "(deployment) and RUN/report.md.")
    export.add_argument("--run", required=True, help="a finished run folder")
    export.add_argument("--repeats", type=int, default=30,
                        help="timed runs per latency at batch 1, per round (a fifth at batch 32; default 30)")
    export.add_argument("--trust-arch", action="store_true",
                        help="build architectures outside torchvision, timm and kdistill.zoo named by the run "
                             "(runs that module's code: only for runs from people you trust)")
    cache = commands.add_parser("cache", help="list or remove the decoded data caches",
                                description="Each entry is one dataset decoded at one image size, with its "
                                            "teacher-signal caches; a run rebuilds a removed entry.")
    action = cache.add_mutually_exclusive_group()
    action.add_argument("--list", action="store_true", help="one row per entry, then the total (the default)")
    action.add_argument("--clear", nargs="*", metavar="KEY",
                        help="remove these entries (keys from --list), or every entry when no key is given")
    cache.add_argument("--cache-dir", help="the cache folder (default: $KDISTILL_CACHE or ~/.cache/kdistill)")
    clean = commands.add_parser("clean", help="make a finished run or sweep folder lean",
                                description="Drop each finished model's training state (optimizer, weight average, "
                                            "the older copy of last.pt), as runs do by default now; best weights, "
                                            "exports, reports and histories stay.")
    clean.add_argument("--run", dest="run_flag", metavar="RUN", help="a finished run or sweep folder")
    clean.add_argument("run", nargs="?", metavar="RUN", help="the folder given without --run")


def parser() -> argparse.ArgumentParser:
    main_parser = argparse.ArgumentParser(
        prog="kdistill", description="Distill a large pretrained image classifier into a small, fast student.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    main_parser.add_argument("--version", action="version", version=f"kdistill {version('kdistill')}")
    commands = main_parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_run, _add_sweep, _add_demo_and_config, _add_predict_and_evaluate, _add_compare_export_cache):
        add(commands)
    return main_parser


def next_run_folder(parent: str) -> str:
    """parent/runN for the smallest N whose folder does not exist yet."""
    number = 1
    while os.path.exists(os.path.join(parent, f"run{number}")):
        number += 1
    return os.path.join(parent, f"run{number}")


def _launch(processes: int, argv: list[str] | None) -> int | None:
    """run --nproc N: this same command in N processes started by torchrun, its exit status; None
    where this process is to run the command itself (one process, or one torchrun started)."""
    if processes < 1:
        raise KdistillError(f"--nproc must be >= 1, got {processes}")
    if "LOCAL_WORLD_SIZE" in os.environ:  # started by torchrun: each process finds its place in its environment
        if int(os.environ["LOCAL_WORLD_SIZE"]) != processes:
            raise KdistillError(f"--nproc is {processes} but torchrun started {os.environ['LOCAL_WORLD_SIZE']} "
                                f"processes on this machine; leave --nproc out under torchrun")
        return None
    if processes == 1:
        return None
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run as torchrun

    launch = parse_args(["--standalone", f"--nproc-per-node={processes}", "-m", "kdistill"])
    # Set here, not parsed: torchrun's parser would take --nproc for an abbreviation of its own flags.
    launch.training_script_args = sys.argv[1:] if argv is None else argv
    try:
        torchrun(launch)
    except ChildFailedError as e:  # torchrun has stopped the other processes
        rank, failure = e.get_first_failure()
        how = (f"exited with code {failure.exitcode}" if failure.exitcode > 0
               else f"was stopped by {failure.signal_name()}")
        raise KdistillError(f"process {rank} of {processes} {how}, so all stopped (its message, if any, is above)"
                            ) from None
    except SignalException:
        raise KeyboardInterrupt from None
    return 0


def _say(message: str) -> None:
    print(printable(message))


def _predict(args) -> None:
    from .predict import Reading, default_output, predict_folder

    output = args.output or default_output(args.run, args.images)
    count = predict_folder(args.run, args.images, output, Reading(args.batch_size, strict=args.strict, log=_say),
                           device=args.device, trust_arch=args.trust_arch, top_k=args.top_k)
    print(f"wrote {count} predictions to {output}")


def _evaluate(args) -> None:
    from .evaluate_folder import evaluate_folder, summary_lines
    from .predict import default_output

    output = args.output or default_output(args.run, args.data, "evaluate", "json")
    results = evaluate_folder(args.run, args.data, output, args.top_k, args.batch_size, args.device,
                              args.trust_arch, log=_say)
    _say("\n".join([*summary_lines(results), f"wrote {output}"]))


def _compare(args) -> None:
    from .compare import compare_runs

    runs = [*args.run_flags, *args.runs]
    if not runs:
        raise KdistillError("name the runs to compare: kdistill compare --run RUN [--run RUN ...]")
    print(printable(compare_runs(runs, args.html)), end="")


def _export(args) -> None:
    from .deploy import EXPORT_TIMING, export_run

    if args.repeats < 1:
        raise KdistillError(f"--repeats must be >= 1, got {args.repeats}")
    export_run(args.run, args.trust_arch, dataclasses.replace(EXPORT_TIMING, repeats=args.repeats), log=_say)
    print(f"wrote {os.path.join(args.run, 'student.onnx')} and student-int8.onnx; the deployment table "
          f"is in {os.path.join(args.run, 'report.md')} and metrics.json")


def _cache(args) -> None:
    from .cache import clear_cache, list_cache
    from .config import Config

    cache_dir = Config(cache_dir=args.cache_dir or "").resolved_cache_dir()
    _say("\n".join(list_cache(cache_dir) if args.clear is None else clear_cache(cache_dir, args.clear)))


def _clean(args) -> None:
    from .clean import clean

    if (args.run_flag is None) == (args.run is None):
        raise KdistillError("name one run or sweep folder: kdistill clean --run RUN")
    clean(args.run_flag or args.run, log=_say)


def _sweep(args) -> None:
    from .sweep import run_sweep

    run_sweep(args.out, args.grid, args.preset, tuple(args.config), _overrides(args, data=args.data), args.sets,
              force=args.force)


def _run(args, argv: list[str] | None) -> int:
    """run, demo and config: build the settings, then print them or run."""
    from .config import build_config
    from .settings import render_config

    printing = args.command == "config" or args.print_config
    if args.command == "demo":
        from .demo import write_digits
        from .fileio import claim_folder

        data = os.path.join(args.out, "data")
        if not printing:
            claim_folder(args.out, args.force)  # before the digits go in
            data = write_digits(data)
        cfg = build_config(args.preset or "demo", tuple(args.config), _overrides(args, data=data, out=args.out),
                           args.sets)
    else:
        cfg = build_config(args.preset, tuple(args.config), _overrides(args, data=args.data, out=args.out), args.sets)
    if printing:
        print(printable(render_config(cfg)), end="")
        return 0
    if args.command == "run" and not cfg.out:  # as YOLO does: the next free runs/runN
        cfg = dataclasses.replace(cfg, out=next_run_folder("runs"))
        print(f"kdistill: no --out given; this run writes to {cfg.out}")
        argv = [*(sys.argv[1:] if argv is None else argv), "--out", cfg.out]  # the same folder for every process
    if args.command == "run" and args.nproc is not None:  # the settings are checked once, here
        status = _launch(args.nproc, argv)
        if status is not None:
            return status
    from .pipeline import run

    run(cfg, force=args.force)
    return 0


COMMANDS = {"predict": _predict, "evaluate": _evaluate, "compare": _compare, "export": _export, "cache": _cache,
            "clean": _clean, "sweep": _sweep}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command in COMMANDS:
            COMMANDS[args.command](args)
            return 0
        return _run(args, argv)
    except KdistillError as e:
        print(printable(f"kdistill: error: {e}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "out", None) or getattr(args, "run", "")
        print(f"\nkdistill: interrupted; finished epochs are saved in {out}. Run the same command again to "
              f"resume.", file=sys.stderr)
        return 130
