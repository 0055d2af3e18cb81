"""Key layouts of the checkpoint files acmix_mm reads, and the conversions between them.

* **Backbone files** (:func:`backbone_state_dict`): a plain state_dict; ``{'state_dict': ...}``
  (mmengine, Lightning); ``{'model': ...}`` (the ACMix authors' training scripts). The prefixes
  ``module.`` (DataParallel) and ``model.`` (Lightning) are stripped, and of a whole
  mmdet/mmseg model only the ``backbone.`` keys are kept.
* **The authors' files** (Pan et al., "On the Integration of Self-Attention and Convolution",
  CVPR 2022): :func:`convert_swin_authors`, :func:`convert_resnet_authors`.
* **Stock networks** (torchvision/mmdet ResNets) loaded into a model whose ACMix layers stand
  where the file has convs: :func:`take_replaced_convs`.
* **Whole-model files** (:func:`model_state_dict`): acmix_mm's training checkpoints, which are at
  once Lightning and mmengine checkpoints. ``state_dict`` holds the wrapped model's own keys
  (``backbone.conv1.weight``, not ``model.backbone.conv1.weight``) and ``meta`` holds
  ``dataset_meta``, so ``mmengine.runner.load_checkpoint(model, path)`` and
  ``mmdet.apis.init_detector(cfg, path)`` load them with their default arguments; the
  ``model.`` prefix of the LightningModule is stripped when saving and put back when Lightning
  loads (:data:`STATE_DICT_LAYOUT` marks such files).

:class:`LoadReport` records what a conversion did to the file's keys.
"""
from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..ops import ACMix
from ..ops.replaced_conv import replaced_conv_keys, replaced_conv_summary
from .safe import CheckpointError

__all__ = ['LoadReport', 'REPLACED_CONV', 'STATE_DICT_LAYOUT_KEY', 'STATE_DICT_LAYOUT', 'MODEL_PREFIX',
           'backbone_state_dict', 'model_state_dict', 'strip_model_prefix', 'add_model_prefix',
           'convert_swin_authors', 'convert_resnet_authors', 'take_replaced_convs',
           'allowed_missing_counters']

# LoadReport.dropped reason of a conv tensor where the model has an ACMix layer.
REPLACED_CONV = 'replaced conv'
STATE_DICT_LAYOUT_KEY = 'state_dict_layout'
STATE_DICT_LAYOUT = 'mmengine'
MODEL_PREFIX = 'model.'


@dataclasses.dataclass
class LoadReport:
    """What loading did to the file's keys.

    Attributes:
        converted: (file key, model key) pairs that were renamed.
        dropped: (file key, reason) pairs left out on purpose (classifier, recomputed buffers,
            the weights of convs that ACMix layers replace).
        missing: model keys the file does not provide that keep their initial values (allowed).
        loaded: number of model keys taken from the file.
        replaced_layers: ACMix layers standing where the file has a conv (a stock ResNet file):
            their conv tensors are in ``dropped``, their ACMix tensors in ``missing``.
    """
    converted: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
    dropped: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
    missing: List[str] = dataclasses.field(default_factory=list)
    loaded: int = 0
    replaced_layers: List[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        """One line: counts per category, short key lists, and the replaced convs in one phrase."""
        def short(keys: Sequence[str]) -> str:
            keys = list(keys)
            return ', '.join(keys[:6]) + (f', ... ({len(keys)} in all)' if len(keys) > 6 else '')
        prefixes = tuple(f'{layer}.' for layer in self.replaced_layers)
        kept_acmix = [k for k in self.missing if prefixes and k.startswith(prefixes)]
        others = [k for k in self.missing if not (prefixes and k.startswith(prefixes))]
        counters = [k for k in others if k.endswith('num_batches_tracked')]
        others = [k for k in others if not k.endswith('num_batches_tracked')]
        reasons = collections.Counter(reason for _, reason in self.dropped
                                      if reason != REPLACED_CONV)
        dropped = '; '.join(f'{n} {reason}' for reason, n in reasons.items()) or 'none'
        n_dropped = sum(reasons.values())
        line = (f'loaded {self.loaded} keys; renamed {len(self.converted)}; dropped '
                f'{n_dropped} ({dropped}); kept at init {len(others)}'
                + (f' ({short(others)})' if others else ''))
        if counters:
            line += f'; {len(counters)} BN num_batches_tracked counters not in the file (start at 0)'
        if self.replaced_layers:
            unused = sum(1 for _, reason in self.dropped if reason == REPLACED_CONV)
            line += '; ' + replaced_conv_summary(self.replaced_layers, unused, len(kept_acmix))
        return line



_STRIPPED_PREFIXES = ('module.', 'model.')


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def backbone_state_dict(obj: Any, path: str = '<checkpoint>',
                       report: Optional[LoadReport] = None) -> 'collections.OrderedDict':
    """The tensors of a loaded checkpoint, with wrapper prefixes removed.

    Args:
        obj: what :func:`safe_load` returned.
        path: the file's name, for error messages.
        report: where keys of a whole detector/segmentor outside ``backbone.`` are recorded as
            dropped.

    Raises:
        CheckpointError: no state_dict found in ``obj``.
    """
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        for key in ('state_dict', 'model', 'module'):
            if _is_state_dict(obj.get(key)):
                obj = obj[key]
                break
        else:
            keys = sorted(map(str, obj))[:10]
            raise CheckpointError(
                f'checkpoint {path!r} holds no state_dict: expected a mapping of tensors, or one '
                f"under 'state_dict' or 'model'; its top-level keys are {keys}")
    elif not _is_state_dict(obj):
        raise CheckpointError(f'checkpoint {path!r} holds a {type(obj).__name__}, not a state_dict')
    state = collections.OrderedDict(obj)
    for prefix in _STRIPPED_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = collections.OrderedDict((k[len(prefix):], v) for k, v in state.items())
    if any(k.startswith('backbone.') for k in state):
        # A whole detector/segmentor: keep its backbone only.
        kept = collections.OrderedDict()
        for k, v in state.items():
            if k.startswith('backbone.'):
                kept[k[len('backbone.'):]] = v
            elif report is not None:
                report.dropped.append((k, 'outside backbone'))
        state = kept
    return state


def convert_swin_authors(state: Mapping[str, torch.Tensor],
                         num_stages: Optional[int] = None) -> Tuple[Dict[str, torch.Tensor], LoadReport]:
    """The authors' Swin-ACmix keys -> :class:`~acmix_mm.models.backbones.SwinACMix` keys.

    ``layers.i.*`` -> ``stages.i.*`` (the block and downsample names inside are the same), the
    final ``norm.*`` -> ``norm{num_stages-1}.*`` (the last stage's output norm); ``head.*``,
    ``*.attn_mask`` and ``*.relative_position_index`` are dropped (the backbone recomputes the two
    buffers for each input size). Keys already in acmix_mm's layout pass unchanged.

    Args:
        state: a state_dict (after :func:`backbone_state_dict`).
        num_stages: stages of the model; None infers it from the ``layers.i``/``stages.i`` keys.
    """
    report = LoadReport()
    if num_stages is None:
        indices = [int(m.group(1)) for k in state
                   for m in [re.match(r'(?:layers|stages)\.(\d+)\.', k)] if m]
        num_stages = max(indices) + 1 if indices else 4
    out: Dict[str, torch.Tensor] = collections.OrderedDict()
    for key, value in state.items():
        if key.startswith('head.'):
            report.dropped.append((key, 'classifier'))
            continue
        if key.endswith('.attn_mask') or key.endswith('.relative_position_index'):
            report.dropped.append((key, 'recomputed buffer'))
            continue
        new = key
        if key.startswith('layers.'):
            new = 'stages.' + key[len('layers.'):]
        elif key.startswith('norm.'):
            new = f'norm{num_stages - 1}.' + key[len('norm.'):]
        if new != key:
            report.converted.append((key, new))
        out[new] = value
    return out, report


def convert_resnet_authors(state: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], LoadReport]:
    """The authors' ResNet-ACmix keys are ResNetACMix's; only the classifier ``fc.*`` is dropped."""
    report = LoadReport()
    out: Dict[str, torch.Tensor] = collections.OrderedDict()
    for key, value in state.items():
        if key.startswith('fc.'):
            report.dropped.append((key, 'classifier'))
        else:
            out[key] = value
    return out, report


def take_replaced_convs(state: Mapping[str, torch.Tensor], model: nn.Module,
                        report: LoadReport) -> Dict[str, torch.Tensor]:
    """A stock network's file, for ``model`` whose ACMix layers stand where it has convs.

    For every :class:`~acmix_mm.ops.ACMix` in ``model`` (say ``layer2.0.conv2``) whose keys the
    file lacks but which has ``layer2.0.conv2.weight`` of the replaced conv's shape (C_out, C_in,
    k, k), that weight (and a ``bias`` of shape (C_out,)) is dropped as ``REPLACED_CONV`` and the
    layer is added to ``report.replaced_layers``: its ACMix tensors may be missing. Files
    without any ``num_batches_tracked`` (torchvision's ImageNet ResNets) may lack those
    counters too. Everything else is left for the fit check.

    Returns:
        The state without the dropped tensors; the ``allow_missing`` prefixes are
        ``report.replaced_layers`` (with a trailing dot) and, where dropped, the counters.
    """
    out = collections.OrderedDict(state)
    for name, module in model.named_modules():
        if not isinstance(module, ACMix):
            continue
        unused = replaced_conv_keys(module, out, f'{name}.')
        if unused is None:
            continue  # ACMix keys for this layer (an ACMix file), or no conv: checked as usual
        for key in unused:
            del out[key]
            report.dropped.append((key, REPLACED_CONV))
        report.replaced_layers.append(name)
    return out


def allowed_missing_counters(model: nn.Module, state: Mapping[str, torch.Tensor]) -> List[str]:
    """BN ``num_batches_tracked`` keys of ``model`` when the file has none at all."""
    if any(k.endswith('num_batches_tracked') for k in state):
        return []
    return [k for k in model.state_dict() if k.endswith('num_batches_tracked')]


def strip_model_prefix(state_dict: Mapping[str, torch.Tensor]) -> 'collections.OrderedDict':
    """``model.x`` -> ``x`` (keys without the prefix are kept as they are), metadata included."""
    out = collections.OrderedDict(
        (k[len(MODEL_PREFIX):] if k.startswith(MODEL_PREFIX) else k, v) for k, v in state_dict.items())
    metadata = getattr(state_dict, '_metadata', None)
    if metadata is not None:
        out._metadata = collections.OrderedDict(
            (k[len(MODEL_PREFIX):] if k.startswith(MODEL_PREFIX) else ('' if k == 'model' else k), v)
            for k, v in metadata.items())
    return out


def add_model_prefix(state_dict: Mapping[str, torch.Tensor]) -> 'collections.OrderedDict':
    """``x`` -> ``model.x``: the keys of the LightningModule that wraps the model."""
    out = collections.OrderedDict((MODEL_PREFIX + k, v) for k, v in state_dict.items())
    metadata = getattr(state_dict, '_metadata', None)
    if metadata is not None:
        out._metadata = collections.OrderedDict(
            ((MODEL_PREFIX + k) if k else 'model', v) for k, v in metadata.items())
    return out


def model_state_dict(checkpoint: Mapping[str, Any], path: str = '<checkpoint>') -> 'collections.OrderedDict':
    """The wrapped model's weights from a checkpoint of any of the layouts we meet.

    Accepts our layout, a Lightning checkpoint of a module holding the model as ``model``,
    an mmengine checkpoint (``state_dict`` or ``model`` key), or a bare state dict.

    Raises:
        CheckpointError: no mapping of tensors under ``state_dict``, ``model`` or the top level.
    """
    for key in ('state_dict', 'model'):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            state_dict = checkpoint[key]
            break
    else:
        state_dict = checkpoint
    if checkpoint.get(STATE_DICT_LAYOUT_KEY) != STATE_DICT_LAYOUT and state_dict and all(
            k.startswith(MODEL_PREFIX) for k in state_dict):
        state_dict = strip_model_prefix(state_dict)
    # DDP-wrapped saves (mmengine's MMDistributedDataParallel) carry a `module.` prefix.
    if state_dict and all(k.startswith('module.') for k in state_dict):
        state_dict = collections.OrderedDict((k[len('module.'):], v) for k, v in state_dict.items())
    if not state_dict or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(
            f'checkpoint {str(path)!r} has no state dict of tensors (looked at keys "state_dict", '
            f'"model" and the top level, whose keys are {sorted(map(str, checkpoint))[:10]})')
    return collections.OrderedDict(state_dict)
