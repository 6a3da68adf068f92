"""How much storing teacher features in float16, or in 8 bits (distill.feature_storage int8), instead
of float32 changes the feature methods' loss terms, on real images with a pretrained teacher.

Teacher: EfficientNet-Lite0 with its ImageNet weights (kdistill.zoo, offline); student: ResNet18
from scratch; --images images of a folder's class subfolders at --size px. The teacher's features
are taken once, stored as float16, int8 and float32 (kdistill.teacher_signal.hooked_outputs, as a
run stores them), and each method's terms computed from each; prints the relative difference from
float32 per method, term and storage.

    python benchmarks/bench_feature_fp16.py ../shared/data/hymenoptera/val --images 32
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from PIL import Image

from kdistill.distillers import AT, PKT, RKD, SP, BuildContext, FitNets, Outputs, Step
from kdistill.features import FeatureTaps
from kdistill.models import standardized_model
from kdistill.teacher_signal import COMPACT_DTYPE, hooked_outputs
from kdistill.batches import Batches

CPU = torch.device("cpu")
TEACHER_ARCH = "kdistill.zoo:efficientnet_lite0"


def images_of(folder: str, count: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    classes = sorted(os.listdir(folder))
    files = [(os.path.join(folder, name, file), label) for label, name in enumerate(classes)
             for file in sorted(os.listdir(os.path.join(folder, name)))]
    picked = [files[i] for i in np.linspace(0, len(files) - 1, count).astype(int)]  # spread over the classes
    pixels = [np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)) for path, _ in picked]
    return (torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255,
            torch.tensor([label for _, label in picked]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.manual_seed(0)
    x, labels = images_of(args.folder, args.images, args.size)
    classes = int(labels.max()) + 1
    teacher, _, _ = standardized_model(TEACHER_ARCH, classes, 0.0, "none", "auto", [0.5] * 3, [0.25] * 3)
    student, _, _ = standardized_model("resnet18", classes, 0.0, "none", "dataset", [0.5] * 3, [0.25] * 3)
    teacher.eval(), student.eval()
    pairs = {"fitnets": ("layer2", "_blocks.5"), "at": ("layer3", "_blocks.10"), "rkd": ("avgpool", "_avg_pooling"),
             "pkt": ("avgpool", "_avg_pooling"), "sp": ("layer3", "_blocks.10")}
    teacher_paths = sorted({t for _, t in pairs.values()})
    batches = Batches(x, labels, lambda batch: batch)
    stored = {dtype: hooked_outputs(teacher, teacher_paths, [batches], 16, CPU, dtype=dtype)[1]
              for dtype in (torch.float16, COMPACT_DTYPE, torch.float32)}
    taps = FeatureTaps(student, sorted({s for s, _ in pairs.values()}), "the student")
    with torch.no_grad():
        student_outputs = Outputs(student(x), taps.take())
    methods = {"fitnets": FitNets(settings=FitNets.Settings(*pairs["fitnets"])),
               "at": AT(settings=AT.Settings([pairs["at"][0]], [pairs["at"][1]])),
               "rkd": RKD(settings=RKD.Settings(*pairs["rkd"])), "pkt": PKT(settings=PKT.Settings(*pairs["pkt"])),
               "sp": SP(settings=SP.Settings(*pairs["sp"]))}
    float32_bytes = sum(value.numel() * 4 for value in stored[torch.float32].values())
    print(f"{args.images} images at {args.size} px; teacher features at {', '.join(teacher_paths)}: "
          f"{float32_bytes / 2**20:.1f} MB in float32, {float32_bytes / 2**21:.1f} MB in float16")
    torch.manual_seed(1)
    for name, method in methods.items():
        method.build(BuildContext(student_outputs.features,
                                  {path: value[:, 0] for path, value in stored[torch.float32].items()}, args.images))
        terms = {}
        for dtype, features in stored.items():
            teacher_outputs = Outputs(torch.zeros(len(x), classes),
                                      {path: value[:, 0].float() for path, value in features.items()})
            with torch.no_grad():
                terms[dtype] = method(Step(student_outputs, labels, teacher_outputs))
        for term, value in terms[torch.float32].items():
            differences = ", ".join(
                f"{label} {abs(terms[dtype][term].item() - value.item()) / max(abs(value.item()), 1e-12):.1e}"
                for label, dtype in (("float16", torch.float16), ("int8", COMPACT_DTYPE)))
            print(f"{name:8s} {term:9s} float32 {value.item():.6g}  relative difference: {differences}")


if __name__ == "__main__":
    main()
