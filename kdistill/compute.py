"""Where and in which precision the numbers are computed: the device, bfloat16 autocast where the
hardware has the units for it, and the memory format that goes with them."""
from __future__ import annotations

import re
from typing import NamedTuple

import torch
from torch import nn

from .errors import KdistillError


class Compute(NamedTuple):
    """Where and in which precision the numbers are computed; both are part of every result."""
    device: torch.device
    precision: str  # "fp32" or "bf16" (autocast)

    def key(self) -> str:
        return f"{self.device.type}-{self.precision}"

    @property
    def channels_last(self) -> bool:
        """The memory format GPU kernels and the CPU's bf16 kernels are fastest with."""
        return self.device.type == "cuda" or self.precision == "bf16"

    def place(self, model: nn.Module) -> nn.Module:
        """The model on this device, in the memory format its kernels are fastest with."""
        model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model


def resolve_device(name: str, what: str = "setting device") -> torch.device:
    """auto|cpu|mps|cuda|cuda:N as a torch.device (auto: cuda when present, else cpu); what names
    the setting or flag in the one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", name):
        raise KdistillError(f"{what} must be auto, cpu, mps, cuda or cuda:N, got {name!r}")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KdistillError(f"{what} is {name!r} but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise KdistillError(f"{what} is {name!r} but this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX): there bf16 autocast
    trains a ResNet18 about twice as fast as float32 (benchmarks/bench_precision.py)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return any(line.startswith("flags") and ({"avx512_bf16", "amx_bf16"} & set(line.split()))
                       for line in f)
    except OSError:
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bfloat16 autocast on CUDA and on CPUs with bfloat16 units, float32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()) else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
