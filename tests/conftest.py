"""Stock ImageNet checkpoint files, made here in the layouts the real ones have.

There is no network: the files are written into a torch hub cache of their own
(``$TORCH_HOME/hub/checkpoints``, under the names of the real downloads), where torch, mmengine
and acmix_mm look before downloading. Their tensors are random (seeded), so that "loaded
exactly" can be told from "left at init".
"""
from __future__ import annotations

import collections
import types

import pytest
import torch

# The file names of the real downloads (mmengine's hub/torchvision_0.12.json, hub/openmmlab.json).
TORCHVISION_FILES = {50: 'resnet50-0676ba61.pth', 101: 'resnet101-63fe2227.pth',
                     18: 'resnet18-f37072fd.pth'}
V1C_FILE = 'resnet50_v1c-2cccc1ad.pth'


def randomised(state, seed: int) -> 'collections.OrderedDict':
    """``state`` with every float tensor replaced by seeded random values of its shape.

    The values keep a trained network's scales (convs ~ N(0, 1/fan_in), BN weights near 1,
    variances near 1, small shifts), so that a model that loads them still gives finite losses.
    """
    gen = torch.Generator().manual_seed(seed)
    out = collections.OrderedDict()
    for key, value in state.items():
        if value.is_floating_point():
            noise = torch.randn(value.shape, generator=gen)
            if value.dim() > 1:
                value = noise * (value[0].numel() ** -0.5)
            elif key.endswith('running_var'):
                value = torch.rand(value.shape, generator=gen) + 0.5
            elif key.endswith('weight'):
                value = 1 + 0.1 * noise
            else:
                value = 0.1 * noise
        out[key] = value.clone()
    return out


def torchvision_resnet_state(depth: int, seed: int = 0) -> 'collections.OrderedDict':
    """A torchvision ImageNet ResNet's keys: mmdet ResNet's names, an ``fc`` head, no BN counters."""
    from mmdet.models.backbones import ResNet
    state = randomised(ResNet(depth=depth).state_dict(), seed)
    state = collections.OrderedDict((k, v) for k, v in state.items()
                                    if not k.endswith('num_batches_tracked'))
    features = 2048 if depth >= 50 else 512
    state['fc.weight'] = torch.randn(1000, features, generator=torch.Generator().manual_seed(seed))
    state['fc.bias'] = torch.zeros(1000)
    return state


def v1c_resnet_state(seed: int = 1) -> 'collections.OrderedDict':
    """mmseg's ResNetV1c-50 (deep stem ``stem.*``), as open-mmlab's resnet50_v1c file holds it."""
    from mmseg.models.backbones import ResNetV1c
    return randomised(ResNetV1c(depth=50).state_dict(), seed)


@pytest.fixture(scope='session')
def stock_checkpoints(tmp_path_factory):
    """``torch_home`` (set TORCH_HOME to it), the files' paths and their state dicts."""
    torch_home = tmp_path_factory.mktemp('torch_home')
    folder = torch_home / 'hub' / 'checkpoints'
    folder.mkdir(parents=True)
    states, paths = {}, {}
    for depth, name in TORCHVISION_FILES.items():
        states[f'resnet{depth}'] = torchvision_resnet_state(depth, seed=depth)
        paths[f'resnet{depth}'] = folder / name
        torch.save(states[f'resnet{depth}'], paths[f'resnet{depth}'])
    states['resnet50_v1c'] = v1c_resnet_state()
    paths['resnet50_v1c'] = folder / V1C_FILE
    torch.save({'state_dict': states['resnet50_v1c']}, paths['resnet50_v1c'])
    return types.SimpleNamespace(torch_home=str(torch_home), paths=paths, states=states)
