"""Networks small enough for runs of a few seconds on a busy CPU, as module:callable architectures
(tests/ is on sys.path): module names as in a torchvision ResNet (layer1, layer2, avgpool, fc), so
the methods' default module paths find them."""
from torch import nn


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
        return self.fc(self.avgpool(self.layer2(self.layer1(self.conv1(x)))).flatten(1))


def tiny_teacher() -> nn.Module:
    return TinyResNetLike(8)


def tiny_student() -> nn.Module:
    return TinyResNetLike(4)
