"""Networks small enough for runs of a few seconds on a busy CPU, as module:callable architectures
(tests/ is on sys.path): module names as in a torchvision ResNet (layer1, layer2, avgpool, fc), so
the methods' default module paths find them.

A test that stops a run mid-training sets TINY_NETS_HOLD_WHEN to a file the run writes (the student's
first checkpoint): from then on every forward waits, so the signal lands mid-training however loaded
the machine is, instead of racing epochs that take a fraction of a second."""
import os
import time

from torch import nn


def hold_while_asked():
    path = os.environ.get("TINY_NETS_HOLD_WHEN")
    while path and os.path.exists(path):
        time.sleep(0.05)


class TinyResNetLike(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.layer1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width),
                                    nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        hold_while_asked()
        return self.fc(self.avgpool(self.layer2(self.layer1(self.conv1(x)))).flatten(1))


def tiny_teacher() -> nn.Module:
    return TinyResNetLike(8)


def tiny_student() -> nn.Module:
    return TinyResNetLike(4)
