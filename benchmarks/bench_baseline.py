"""The `recommended` preset's baseline alone: the student's recipe without a teacher, on the same
stored views a run's baseline replays, without training the teacher or storing its signal.

The baseline differs from the distilled student only by the teacher (pipeline.train_students), so
its row can be re-measured on its own when something changes the baseline alone, as the fix that
gave it the student's label smoothing did. Prints the best val accuracy with its epoch and source.

    python benchmarks/bench_baseline.py --data ../shared/data/cifar10-seedlike --out /work/runs/baseline-s0 \
        --set image_size=64 --set student.input_size=128 --seed 0
"""
from __future__ import annotations

import argparse
import os

from kdistill.augmentations import stored_views, view_params
from kdistill.batcher import ImageBatcher
from kdistill.compute import Compute, resolve_device, resolve_precision
from kdistill.config import build_config
from kdistill.data import prepare, scan_dataset
from kdistill.distillers import CrossEntropy
from kdistill.fileio import claim_folder
from kdistill.pipeline import StudentTraining, make_logger, train_student
from kdistill.callbacks import offered_val_acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, help="a folder for its checkpoints and log (resumable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="a setting, as kdistill run --set")
    args = parser.parse_args()
    cfg = build_config("recommended", (), {"data": os.path.abspath(args.data), "out": args.out, "seed": args.seed},
                       args.sets)
    claim_folder(cfg.out)
    log = make_logger(cfg.out)
    device = resolve_device(cfg.device)
    compute = Compute(device, resolve_precision(cfg.precision, device))
    data = prepare(cfg.data, cfg.image_size, cfg.resolved_cache_dir(), workers=cfg.workers,
                   max_pixels=cfg.max_image_pixels, log=log,
                   scanned=scan_dataset(cfg.data, cfg.val_fraction, cfg.seed, cache_dir=cfg.resolved_cache_dir()))
    batcher = ImageBatcher(data, cfg, device, channels_last=compute.channels_last)
    # The views a views-mode run stores for its student, which its baseline replays (teacher.py).
    views = stored_views(cfg.augment, len(data.splits["train"].files), cfg.distill.views, cfg.image_size, cfg.seed,
                         view_params(cfg))
    log(f"baseline alone: {compute.precision} on {device}, label smoothing {cfg.student.label_smoothing}, "
        f"{views.shape[1]} stored views per image")
    _, _, history = train_student(StudentTraining(cfg, data, batcher("val"), compute, log), "baseline", cfg.seed,
                                  batcher("train", views=views),
                                  CrossEntropy(label_smoothing=cfg.student.label_smoothing))
    best = max(history, key=offered_val_acc)
    log(f"baseline alone: best val acc {offered_val_acc(best):.4f} at epoch {best['epoch']} "
        f"({best.get('best_source', 'raw')}), final {history[-1]['val_acc']:.4f}, "
        f"{sum(row['seconds'] for row in history) / 60:.1f} min")


if __name__ == "__main__":
    main()
