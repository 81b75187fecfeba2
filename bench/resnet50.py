"""ResNet-50 v1.5, the architecture of torchvision's resnet50, written out for the benchmarks.

v1.5 puts the stride-2 of each stage's first bottleneck in the 3x3 conv (v1 has it in the
first 1x1). Parameter names and shapes follow torchvision's, so its state_dict would load.
"""

from __future__ import annotations

import torch
from torch import nn


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride) -> 1x1 expand (x4), plus the shortcut."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + shortcut)


class ResNet(nn.Module):
    """Stem (7x7/2 conv, max-pool), four stages of bottlenecks, global average pool, fc."""

    def __init__(self, blocks_per_stage: tuple[int, int, int, int] = (3, 4, 6, 3), num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        channels = 64
        stages = []
        for i, blocks in enumerate(blocks_per_stage):
            width = 64 * 2**i
            stage, channels = self._make_stage(channels, width, blocks, stride=1 if i == 0 else 2)
            stages.append(stage)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(channels, num_classes)
        self._init_weights()

    @staticmethod
    def _make_stage(in_channels: int, width: int, blocks: int, stride: int) -> tuple[nn.Sequential, int]:
        out_channels = width * Bottleneck.expansion
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        layers = [Bottleneck(in_channels, width, stride, downsample)]
        layers += [Bottleneck(out_channels, width) for _ in range(blocks - 1)]
        return nn.Sequential(*layers), out_channels

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(num_classes: int = 1000) -> ResNet:
    return ResNet((3, 4, 6, 3), num_classes)


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Plausible inference statistics for an untrained model, so eval-mode BatchNorm is not the identity.

    The last BatchNorm of each bottleneck gets a small scale (as after training), which keeps
    the activations of a random 16-block residual network in a sane range.
    """
    with torch.no_grad():
        for name, m in model.named_modules():
            if not isinstance(m, nn.BatchNorm2d):
                continue
            c = m.num_features
            scale = 0.2 if name.endswith("bn3") else 1.0
            m.weight.copy_(scale * (0.5 + torch.rand(c, generator=generator)))
            m.bias.copy_(0.1 * torch.randn(c, generator=generator))
            m.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
            m.running_var.copy_(0.5 + torch.rand(c, generator=generator))


if __name__ == "__main__":
    net = resnet50()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    params = sum(p.numel() for p in net.parameters())
    assert len(convs) == 53, len(convs)
    assert params == 25_557_032, params  # torchvision resnet50's count
    with torch.no_grad():
        assert net.eval()(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)
    print(f"resnet50: {len(convs)} convs, {params} parameters")
