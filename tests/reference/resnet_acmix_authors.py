"""Spec-literal reference of the authors' ImageNet ResNet-ACmix (tests only).

Restates /work/shared/acmix-spec.md section 3 (Pan et al., CVPR 2022): a torchvision-style
ResNet v1.5 with a 1000-class ``fc`` head, in which every bottleneck's 3x3 conv2 is the authors'
ACmix operator (see :mod:`tests.reference.acmix_authors`). Its ``state_dict`` has the authors'
checkpoint keys, so tests use it as the source of "authors' weights and outputs" for
:class:`acmix_mm.models.backbones.resnet_acmix.ResNetACMix`. Written from the description, not
from the authors' code; it keeps their initialisation order (a kaiming loop over every Conv2d,
which overwrites the operator's shift init of ``dep_conv``).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .acmix_authors import AuthorsACMix

LAYERS = {26: (1, 2, 4, 1), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3)}


class AuthorsBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = AuthorsACMix(width, width, 7, 4, 3, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class AuthorsResNetACmix(nn.Module):
    """The authors' classifier. ``forward_stages`` returns the layer1..layer4 maps."""

    def __init__(self, depth: int = 50, num_classes: int = 1000) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        blocks = LAYERS[depth]
        self.layer1 = self._make_layer(64, blocks[0], 1)
        self.layer2 = self._make_layer(128, blocks[1], 2)
        self.layer3 = self._make_layer(256, blocks[2], 2)
        self.layer4 = self._make_layer(512, blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * AuthorsBottleneck.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * AuthorsBottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * AuthorsBottleneck.expansion, 1, stride=stride,
                          bias=False),
                nn.BatchNorm2d(planes * AuthorsBottleneck.expansion))
        layers = [AuthorsBottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * AuthorsBottleneck.expansion
        layers += [AuthorsBottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outs.append(x)
        return tuple(outs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stages(x)[-1]
        return self.fc(torch.flatten(self.avgpool(x), 1))
