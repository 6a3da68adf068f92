"""bf16 on the CPU: the convolutions whose torch kernels give garbage gradients run in float32.

torch 2.14's CPU bf16 convolution leaves part of the weight gradient uninitialized for a strided
kernel over a one-pixel-wide input: the values are whatever the freed memory held. In a run that
memory was last used by other work (the background checkpoint writer, another epoch's buffers), so
the same run went NaN or not depending on the machine's load. Here freed memory is filled with
large values on purpose, which makes the garbage certain instead of timing-dependent.
"""
import pytest
import torch
import torchvision

from kdistill.compute import Compute, bf16_conv_fails

CPU_BF16 = Compute(torch.device("cpu"), "bf16")


def _litter_freed_memory() -> None:
    """Leave 1e30 in freed blocks of the sizes a ResNet18's layer4 gradients take (the allocator hands
    such blocks out again; freeing the first large one lifts glibc's mmap threshold to its size)."""
    for _ in range(2):
        for count in (512 * 256 * 9, 512 * 256 * 9 // 2, 256 * 128 * 9, 64 * 64 * 9):
            junk = torch.full((count,), 1e30)
            del junk


def _weight_grads(model: torch.nn.Module, x: torch.Tensor, bf16: bool) -> dict[str, torch.Tensor]:
    model.zero_grad()
    _litter_freed_memory()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(x).float().square().mean()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("height, width, stride", [(1, 1, 2), (4, 1, 2), (1, 1, 3), (1, 1, (1, 2))])
def test_a_strided_conv_over_a_one_pixel_wide_input_gets_its_float32_gradient(height, width, stride):
    torch.manual_seed(0)
    conv = CPU_BF16.place(torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, stride=stride, padding=1, bias=False)))
    x = torch.randn(8, 64, height, width).contiguous(memory_format=torch.channels_last)
    exact = _weight_grads(conv, x, bf16=False)["0.weight"]
    for _ in range(10):  # without the float32 detour, at least one of ten held garbage in 39 of 40 tries here
        got = _weight_grads(conv, x, bf16=True)["0.weight"]
        assert (got - exact).abs().max() <= 1e-3 * exact.abs().max()


def test_a_resnet18_at_16_px_gets_sound_bf16_gradients():
    torch.manual_seed(0)
    model = CPU_BF16.place(torchvision.models.resnet18(num_classes=3))
    x = torch.randn(8, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    exact = _weight_grads(model, x, bf16=False)
    for _ in range(5):
        got = _weight_grads(model, x, bf16=True)
        for name, grad in exact.items():
            # bf16 rounding through 18 layers moves a gradient by up to about its own scale (0.9x
            # seen), garbage by twenty orders of magnitude.
            assert (got[name] - grad).abs().max() <= 4 * grad.abs().max() + 1e-6, name


def test_every_other_convolution_stays_in_bf16():
    model = CPU_BF16.place(torch.nn.Conv2d(8, 8, 3, stride=2, padding=1))
    for shape, expected in (((2, 8, 4, 4), torch.bfloat16), ((2, 8, 1, 1), torch.float32)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(torch.randn(shape)).dtype == expected
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")  # the float32 detour leaves autocast as it was


def test_which_convolutions_torchs_bf16_kernels_break():
    conv = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
    assert bf16_conv_fails(conv, torch.zeros(1, 8, 1, 1)) and bf16_conv_fails(conv, torch.zeros(1, 8, 4, 1))
    assert not bf16_conv_fails(conv, torch.zeros(1, 8, 2, 2))
    assert not bf16_conv_fails(torch.nn.Conv2d(8, 8, 1, stride=2), torch.zeros(1, 8, 1, 1))  # no padding taps
    assert not bf16_conv_fails(torch.nn.Conv2d(8, 8, 3, padding=1), torch.zeros(1, 8, 1, 1))  # stride 1
