"""Loading the checkpoint of a network into the same network with some convs replaced by ACMix.

A user who puts ACMix into a stock ResNet (``dcn=dict(type='ACMix')``) loads the stock network's
ImageNet file. Every layer but the replaced convs is in it; where an ACMix layer stands, the file
holds the conv's ``weight`` (and maybe its ``bias``). torch's and mmengine's loaders would call
that entry unexpected and list every ACMix tensor (12 per layer) as missing: hundreds of keys for
a ResNet-50, which hide any real mismatch.

:func:`take_replaced_conv` (called by ``ACMix._load_from_state_dict``) recognises such an entry
instead (:func:`replaced_conv_keys`: a ``weight`` of the replaced conv's shape, and no ACMix key,
at the layer's prefix; acmix_mm's own backbone loader uses the same test). It takes the conv's
tensors out of the loader's dict as unused and puts the layer's current tensors in, so that
every ACMix tensor keeps its value through a strict or a non-strict load. Each load of a module
then logs one line for all its ACMix layers, e.g.::

    ResNet: 13 ACMix layers replace convs of the checkpoint (layer2.0.conv2, layer2.1.conv2, ...,
    layer4.2.conv2): its 13 conv tensors there are unused; the layers' 156 ACMix tensors keep
    their init

Why frames: the line must come at the end of the load, once per loaded module, while
``_load_from_state_dict`` only sees one layer. Both loaders (torch's ``Module.load_state_dict``
and mmengine's ``load_state_dict``) walk the module tree with a nested ``load(module,
local_state_dict, prefix)`` and run the root's ``load_state_dict`` post-hooks last; the
outermost such frame names the root, which gets a one-shot post-hook that writes the line. Where
no such frame is found (another loader), each layer logs its own line.
"""
from __future__ import annotations

import logging
import sys
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from mmengine.logging import print_log
from torch import nn

__all__ = ['take_replaced_conv', 'replaced_conv_keys', 'replaced_conv_summary']


def replaced_conv_summary(layers: Sequence[str], unused: int, kept: int) -> str:
    """The report's wording: ``layers`` (module names) replaced convs whose ``unused`` file
    tensors were not loaded; ``kept`` ACMix tensors keep their init."""
    names = list(layers)
    shown = ', '.join(names) if len(names) <= 3 else f'{names[0]}, {names[1]}, ..., {names[-1]}'
    plural = 's' if len(names) != 1 else ''
    return (f'{len(names)} ACMix layer{plural} replace convs of the checkpoint ({shown}): its '
            f'{unused} conv tensors there are unused; the layers\' {kept} ACMix tensors keep '
            'their init')


def replaced_conv_keys(module: nn.Module, state_dict: Mapping[str, torch.Tensor],
                       prefix: str) -> Optional[List[str]]:
    """The keys of a replaced conv's entry that ``state_dict`` holds for ACMix ``module``, or None.

    An entry is a conv's when ``state_dict`` has no ACMix key of ``module`` under ``prefix``
    but a ``weight`` of the replaced conv's shape (C_out, C_in, k, k), with k ``module``'s
    ``kernel_conv``; a ``bias`` of shape (C_out,) belongs to it too.
    """
    if any(key in state_dict for key in module.state_dict(prefix=prefix, keep_vars=True)):
        return None
    shape = (module.out_channels, module.in_channels) + tuple(module.dep_conv.kernel_size)
    weight = state_dict.get(prefix + 'weight')
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != shape:
        return None
    bias = state_dict.get(prefix + 'bias')
    if isinstance(bias, torch.Tensor) and tuple(bias.shape) == shape[:1]:
        return [prefix + 'weight', prefix + 'bias']
    return [prefix + 'weight']


def take_replaced_conv(module: nn.Module, state_dict: Dict[str, torch.Tensor],
                       prefix: str) -> bool:
    """Swap a replaced conv's entry in a loader's dict for ``module``'s own tensors, in place.

    Args:
        module: the ACMix layer being loaded.
        state_dict: the loader's dict for ``module`` (keys start with ``prefix``); modified.
        prefix: ``module``'s key prefix, e.g. ``'layer2.0.conv2.'``.

    Returns:
        True if the dict held a replaced conv's entry (:func:`replaced_conv_keys`: taken out and
        reported), False otherwise (it loads as usual).
    """
    unused = replaced_conv_keys(module, state_dict, prefix)
    if unused is None:
        return False
    for key in unused:
        del state_dict[key]
    own = module.state_dict(prefix=prefix, keep_vars=True)
    for key, value in own.items():
        # A copy: the loaders copy_ (or, with assign=True, adopt) what they find here.
        state_dict[key] = value.detach().clone()
    _report(prefix[:-1], len(unused), len(own))
    return True


class _PendingReport:
    """The replaced convs met so far in one load of one root module."""

    def __init__(self, root: nn.Module) -> None:
        self.layers: List[str] = []
        self.unused = 0
        self.kept = 0
        self.handle = root.register_load_state_dict_post_hook(self._flush)

    def _flush(self, root: nn.Module, incompatible_keys) -> None:
        self.handle.remove()
        _PENDING.pop(id(root), None)
        _log(f'{type(root).__name__}: {replaced_conv_summary(self.layers, self.unused, self.kept)}')


# id(root module) -> its report, only while that module is being loaded.
_PENDING: Dict[int, _PendingReport] = {}


def _report(layer: str, unused: int, kept: int) -> None:
    root = _root_of_current_load()
    if root is None:
        _log(replaced_conv_summary([layer], unused, kept))
        return
    pending = _PENDING.get(id(root))
    if pending is None:
        pending = _PENDING[id(root)] = _PendingReport(root)
    pending.layers.append(layer)
    pending.unused += unused
    pending.kept += kept


def _root_of_current_load() -> Optional[nn.Module]:
    """The module at the top of the running ``load(module, local_state_dict, prefix)`` walk."""
    root = None
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == 'load' and 'local_state_dict' in code.co_varnames[:code.co_argcount]:
            module = frame.f_locals.get('module')
            if isinstance(module, nn.Module):
                root = module
        frame = frame.f_back
    return root


def _log(message: str) -> None:
    # mmengine's current logger: the run's log file and console, as the loaders' own reports.
    print_log(message, logger='current', level=logging.INFO)
