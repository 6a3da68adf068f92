"""Where and in which precision the numbers are computed: the device, bfloat16 autocast where the
hardware has the units for it, the memory format that goes with them, and the processes (torchrun)
that share the work."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .errors import KdistillError


class Compute(NamedTuple):
    """Where, in which precision and memory format the numbers of one model are computed; all three
    are part of every result (precision_choice.py picks them per model under precision: auto)."""
    device: torch.device
    precision: str  # "fp32" or "bf16" (autocast)
    layout: str = ""  # "channels_last" or "contiguous"; "": the default of the device and precision
    # The precision of the forward passes whose outputs are kept (a teacher's stored signal), where it
    # is not the training's: a forward pass can be fastest in another (precision_choice.py).
    outputs: str = ""

    @classmethod
    def of(cls, device: torch.device, precision: str, channels_last: bool) -> Compute:
        """The Compute with this memory format, its layout left "" where that is the default, so
        that checkpoints and signal caches of runs before per-model choices keep their keys."""
        default = cls(device, precision)
        return default if default.channels_last == channels_last else cls(
            device, precision, "channels_last" if channels_last else "contiguous")

    def key(self) -> str:
        return (f"{self.device.type}-{self.precision}" + (f"-{self.layout}" if self.layout else "")
                + (f"-outputs-{self.outputs}" if self.outputs else ""))

    def label(self) -> str:
        """fp32, fp32+cl, bf16 or bf16+cl: the precision and, where channels_last, the memory format;
        then the outputs' precision where it is another (fp32+cl, outputs bf16)."""
        outputs = f", outputs {self.outputs}" if self.outputs else ""
        return self.precision + ("+cl" if self.channels_last else "") + outputs

    @property
    def output_precision(self) -> str:
        """The precision of forward passes whose outputs are kept."""
        return self.outputs or self.precision

    @property
    def channels_last(self) -> bool:
        """By default the memory format GPU kernels and the CPU's bf16 kernels are fastest with."""
        if self.layout:
            return self.layout == "channels_last"
        return self.device.type == "cuda" or self.precision == "bf16"

    def place(self, model: nn.Module) -> nn.Module:
        """The model on this device, in its memory format; on the CPU in bf16, with the convolutions
        whose bf16 gradients are wrong computed in float32."""
        model.to(self.device)
        if self.device.type == "cpu" and self.precision == "bf16":
            float32_where_bf16_conv_fails(model)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model


def bf16_conv_fails(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether torch's CPU bf16 convolution would give a wrong weight gradient for input x.

    With torch 2.14's CPU kernels (oneDNN, with or without AMX), a strided convolution over an
    input one pixel wide (or high) leaves the gradient of the kernel taps that see only padding
    uninitialized: it holds whatever that memory held before, up to 1e36 here. ResNets meet it at
    small image sizes (ResNet18's layer4.0.conv1 at 16 px and less). The values then depend on which
    buffers the process freed last, so the same run went NaN or not with the machine's load and
    the background checkpoint writer's timing (benchmarks/RESULTS.md, "bf16 under load").
    """
    return any(size == 1 and stride > 1 and kernel > 1
               for size, stride, kernel in zip(x.shape[-2:], conv.stride, conv.kernel_size))


def float32_where_bf16_conv_fails(model: nn.Module) -> None:
    """Run each Conv2d of model in float32 for the inputs where bf16 gives wrong gradients
    (bf16_conv_fails), in bf16 as before elsewhere: the checks cost a comparison per convolution."""
    entered: dict[int, list] = {}

    def before(conv: nn.Conv2d, args: tuple):
        x = args[0]
        if not (torch.is_autocast_enabled("cpu") and bf16_conv_fails(conv, x)):
            return None
        exact = torch.autocast("cpu", enabled=False)
        exact.__enter__()
        entered.setdefault(id(conv), []).append(exact)
        return (x.float(), *args[1:])

    def after(conv: nn.Conv2d, args: tuple, output: torch.Tensor):
        pending = entered.get(id(conv))
        if pending:
            pending.pop().__exit__(None, None, None)

    for module in model.modules():
        if isinstance(module, nn.Conv2d) and not getattr(module, "_kdistill_float32_guard", False):
            module.register_forward_pre_hook(before)
            module.register_forward_hook(after)
            module._kdistill_float32_guard = True


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


# The processes started by torchrun: each trains on its share of every batch, DDP averages the
# gradients. Waits on one process's one-off work (decoding the data, the teacher's signal) take as
# long as the data is large: they use a group of their own, without the collectives' timeout.
ONE_OFF_WAIT = timedelta(days=1)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes training together (torchrun's RANK, WORLD_SIZE,
    LOCAL_RANK): rank 0 of 1 without torchrun. Rank 0 alone writes the run folder."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # its rank on its own node: its GPU, and 0 for the node's first process
    sync_bn: bool = True  # BatchNorm statistics over the global batch (SyncBatchNorm)
    one_off_group: Any = None  # gloo group for the waits on one-off work

    @property
    def joined(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world_size

    def main_first(self, work: Callable[[], Any]) -> Any:
        """work() on each node's first process, then, once it is done, on the others, which find what
        it cached (the cache's file locks make nodes that share the cache build it once)."""
        if not self.joined:
            return work()
        result = work() if self.local_rank == 0 else None
        dist.barrier(group=self.one_off_group)
        return result if self.local_rank == 0 else work()

    def from_main(self, value: Any) -> Any:
        """Rank 0's value (a checkpoint it read), on every process."""
        if not self.joined:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list:
        """Every process's value, in rank order."""
        if not self.joined:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """tensor summed over the processes, in place."""
        if self.joined:
            dist.all_reduce(tensor)
        return tensor

    def earliest(self, count: torch.Tensor) -> torch.Tensor:
        """The smallest non-zero value of an integer tensor over the processes; 0 where all are 0."""
        if not self.joined:
            return count
        never = torch.iinfo(count.dtype).max
        earliest = torch.where(count == 0, never, count)
        dist.all_reduce(earliest, op=dist.ReduceOp.MIN)
        return torch.where(earliest == never, 0, earliest)

    def share_buffers(self, module: nn.Module | None) -> None:
        """Rank 0's buffers (BatchNorm statistics) on every process: without sync_bn each process's
        own batches move them apart; with it they are equal already."""
        if self.joined and module is not None:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def sync_batch_norm(self, module: nn.Module, device: torch.device) -> None:
        """With several processes and sync_bn, every BatchNorm inside module (in place) computes
        its training statistics over the global batch, as one process would: torch's SyncBatchNorm
        on CUDA, ReducedBatchNorm elsewhere."""
        if not (self.joined and self.sync_bn):
            return
        if device.type == "cuda":
            nn.SyncBatchNorm.convert_sync_batchnorm(module)
            return
        for layer in module.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.__class__ = ReducedBatchNorm  # the same parameters and buffers, another forward

    def distribute(self, module: nn.Module, device: torch.device, sync_buffers: bool = True) -> nn.Module:
        """module in DistributedDataParallel, which averages its gradients over the processes (and
        with sync_buffers gives every process rank 0's buffers before each training forward);
        module itself in one process, or when nothing in it trains."""
        if not self.joined or not any(p.requires_grad for p in module.parameters()):
            return module
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                       forward_sync_buffers=sync_buffers)


ONE_PROCESS = Ranks()


def join_ranks(device_setting: str, timeout_s: int, sync_bn: bool) -> tuple[Ranks, torch.device]:
    """Join the processes torchrun started (its environment: RANK, WORLD_SIZE, LOCAL_RANK and
    MASTER_ADDR/PORT) with their device: on CUDA each uses the GPU cuda:LOCAL_RANK and NCCL, on the
    CPU gloo. A collective that waits longer than timeout_s on another process fails. Without
    torchrun, or with one process: ONE_PROCESS and the device setting as it is."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return ONE_PROCESS, resolve_device(device_setting)
    if "RANK" not in os.environ or "LOCAL_RANK" not in os.environ:
        raise KdistillError(f"WORLD_SIZE is {world_size} but RANK or LOCAL_RANK is not set: start several "
                            f"processes with torchrun or kdistill run --nproc")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device_setting == "mps" or re.fullmatch(r"cuda:\d+", device_setting):
        raise KdistillError(f"setting device is {device_setting!r}, but with several processes each uses the GPU "
                            f"cuda:LOCAL_RANK (device cuda or auto) or the CPU (device cpu)")
    device = resolve_device(device_setting)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise KdistillError(f"process {rank} has LOCAL_RANK {local_rank} but this machine has "
                                f"{torch.cuda.device_count()} CUDA devices: start at most one process per GPU")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise KdistillError(f"WORLD_SIZE is {world_size} but {missing[0]} is not set: start several processes with "
                            f"torchrun or kdistill run --nproc, or set MASTER_ADDR and MASTER_PORT")
    try:
        # On CUDA, NCCL for GPU tensors and gloo for the few on the CPU (a weight average's counter).
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        one_off_group = dist.new_group(backend="gloo", timeout=ONE_OFF_WAIT)
    except dist.DistError as e:
        raise KdistillError(f"process {rank} of {world_size}: the processes did not all join within "
                            f"ddp_timeout_s={timeout_s} s ({first_line(e)})") from None
    return Ranks(rank, world_size, local_rank, sync_bn, one_off_group), device


def leave_ranks(ranks: Ranks) -> None:
    if ranks.joined and dist.is_initialized():
        dist.destroy_process_group()


def first_line(error: BaseException) -> str:
    """An error's first line, without the source location gloo starts it with."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text).split(". This is typically")[0]
    return text[:200]


def lost_process(error: BaseException) -> bool:
    """Whether error is a collective that failed: another process stopped, or stopped answering.
    Most of gloo's messages name its source files; some do not ("Application timeout caused pair
    closure", from DDP's first broadcast), so a RuntimeError raised inside torch.distributed or
    DDP counts too."""
    if isinstance(error, dist.DistError):
        return True
    if not isinstance(error, RuntimeError):
        return False
    return "/gloo/" in str(error) or _raised_in(error, (os.path.dirname(dist.__file__),
                                                         os.path.abspath(torch.nn.parallel.distributed.__file__)))


def _raised_in(error: BaseException, places: tuple[str, ...]) -> bool:
    """Whether the innermost Python frame of error's traceback is in a file or folder of places."""
    frame = error.__traceback__
    if frame is None:
        return False
    while frame.tb_next is not None:
        frame = frame.tb_next
    return os.path.abspath(frame.tb_frame.f_code.co_filename).startswith(places)


class ReducedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """SyncBatchNorm's computation on the CPU, where torch's runs only on GPUs (and DDP refuses it):
    in training, the statistics of the global batch from per-channel sums added up over the
    processes (all_reduce, which passes the gradients back to every process's share)."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized()):
            return super().forward(x)  # eval: the running statistics, nothing to exchange
        values = x.float()
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() // x.shape[1]], dtype=values.dtype, device=x.device)
        totals = _SumOverProcesses.apply(torch.cat([values.sum(dims), count]))
        n = totals[-1]
        mean = totals[:-1] / n
        centered = values - mean.view(shape)  # two passes: the variance as exact as F.batch_norm's
        var = _SumOverProcesses.apply((centered * centered).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
                self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
                self.running_var.mul_(1 - factor).add_(var * n / (n - 1), alpha=factor)
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


class _SumOverProcesses(torch.autograd.Function):
    """all_reduce (sum) that passes gradients back: every process's share moves the sum they all use."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _SumOverProcesses.apply(grad)
