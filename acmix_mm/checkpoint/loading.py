"""Loading weights into a model: a backbone from any layout, or a whole model strictly.

Both read the file with :func:`~acmix_mm.checkpoint.safe.safe_load` (nothing in it runs) and
check it with :func:`~acmix_mm.checkpoint.fit.check_state_dict_fits` before copying anything: a
file that does not fit leaves the model untouched.
"""
from __future__ import annotations

import collections
import logging
import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .fit import check_model_fits, check_state_dict_fits
from .layouts import LoadReport, allowed_missing_counters, backbone_state_dict, model_state_dict
from .safe import load_checkpoint_dict, safe_load
from .sources import resolve_checkpoint

__all__ = ['Converter', 'load_backbone_weights', 'load_model_weights']

Converter = Callable[[Mapping[str, torch.Tensor]], Tuple[Dict[str, torch.Tensor], LoadReport]]


def load_backbone_weights(module: nn.Module, path: str | os.PathLike,
                          converter: Optional[Converter] = None,
                          drop_prefixes: Sequence[str] = (),
                          allow_missing: Sequence[str] = (),
                          logger: Optional[str] = 'current') -> LoadReport:
    """Load a checkpoint file into ``module`` safely and strictly, converting its keys.

    Args:
        module: the backbone.
        path: the checkpoint (see the module docstring for the layouts accepted).
        converter: maps the file's state_dict to ``module``'s keys and reports what it did (e.g.
            :func:`convert_swin_authors`); None keeps the keys.
        drop_prefixes: file keys starting with one of these are dropped (e.g. ``('fc.',)``).
        allow_missing: prefixes of ``module`` keys that may be absent from the file and keep
            their initial values (e.g. SwinACMix's extra output norms).
        logger: mmengine logger name for the summary line; None logs nothing.

    Returns:
        The :class:`LoadReport`.

    Raises:
        FileNotFoundError, CheckpointError: unreadable or unsafe file (:func:`~acmix_mm.checkpoint.safe.safe_load`); keys
            or shapes that do not match ``module`` (the message names them).
    """
    path = resolve_checkpoint(path)
    report = LoadReport()
    state = backbone_state_dict(safe_load(path), path, report)
    kept = collections.OrderedDict()
    for key, value in state.items():
        if any(key.startswith(p) for p in drop_prefixes):
            report.dropped.append((key, 'classifier'))
        else:
            kept[key] = value
    if converter is not None:
        kept, conv_report = converter(kept)
        report.converted += conv_report.converted
        report.dropped += conv_report.dropped
        report.replaced_layers += conv_report.replaced_layers
        allow_missing = tuple(allow_missing) + tuple(f'{n}.' for n in conv_report.replaced_layers)
        if conv_report.replaced_layers:
            allow_missing += tuple(allowed_missing_counters(module, kept))
    own = module.state_dict()
    missing = check_state_dict_fits(own, kept, path, type(module).__name__, allow_missing)
    with torch.no_grad():
        for key, value in kept.items():
            own[key].copy_(value.to(dtype=own[key].dtype))
    report.missing = missing
    report.loaded = len(kept)
    if logger is not None:
        from mmengine.logging import print_log
        print_log(f'{type(module).__name__} <- {path}: {report.summary()}', logger=logger,
                  level=logging.INFO)
    return report



def load_model_weights(model: nn.Module, path: str,
                       checkpoint: Optional[Mapping[str, Any]] = None) -> None:
    """Load the weights of checkpoint ``path`` into the whole ``model``, strictly.

    Args:
        model: the wrapped mmengine model (``MMLightningModule.model``).
        path: the file; read here unless ``checkpoint`` is given.
        checkpoint: the file's contents, already read by
            :func:`~acmix_mm.checkpoint.safe.load_checkpoint_dict` (callers read early, to fail
            before building anything).

    Raises:
        FileNotFoundError, CheckpointError: an unreadable or unsafe file; a checkpoint of another
            architecture (the message lists the mismatched keys and shapes; nothing is loaded).
    """
    if checkpoint is None:
        checkpoint = load_checkpoint_dict(path)
    state_dict = model_state_dict(checkpoint, path)
    check_model_fits(model, state_dict, path)
    model.load_state_dict(state_dict, strict=True)
