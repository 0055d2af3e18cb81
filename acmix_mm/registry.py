"""acmix_mm's registry tree.

The registries are children of mmengine's roots with scope ``acmix_mm``, so that a config in
mmdet's or mmseg's scope can name ``type='acmix_mm.ResNetACMix'`` with no ``custom_imports``:
mmengine imports ``acmix_mm.registry`` when it meets the ``acmix_mm.`` prefix, finds this scope
among the root's children, and the ``locations`` below import the modules that register.

For configs that import the package with ``custom_imports`` and then use a bare
``type='ResNetACMix'``, :func:`mirror_into_openmmlab` also registers every acmix_mm model into
mmdet's and mmseg's ``MODELS``, for whichever of the two is installed.
"""
from __future__ import annotations

import difflib
import importlib
import re
from typing import Iterable, Optional, Sequence

from mmengine.registry import DATASETS as MMENGINE_DATASETS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import TRANSFORMS as MMENGINE_TRANSFORMS
from mmengine.registry import Registry

SCOPE = 'acmix_mm'

MODELS = Registry('model', parent=MMENGINE_MODELS, scope=SCOPE, locations=['acmix_mm.models'])
DATASETS = Registry('dataset', parent=MMENGINE_DATASETS, scope=SCOPE, locations=['acmix_mm.datasets'])
TRANSFORMS = Registry('transform', parent=MMENGINE_TRANSFORMS, scope=SCOPE,
                      locations=['acmix_mm.datasets'])

# Downstream registries that receive a copy of every acmix_mm model, when installed.
_DOWNSTREAM_MODEL_REGISTRIES = ('mmdet.registry', 'mmseg.registry')


def mirror_into_openmmlab() -> list[str]:
    """Register every acmix_mm model into mmdet's and mmseg's ``MODELS`` where installed.

    Returns the scopes that received the models. A missing mmdet or mmseg is not an error:
    a user may install only one of them.
    """
    mirrored = []
    for module_name in _DOWNSTREAM_MODEL_REGISTRIES:
        try:
            downstream = importlib.import_module(module_name).MODELS
        except ImportError:
            continue
        for name, cls in MODELS.module_dict.items():
            if downstream.get(name) is not cls and name not in downstream.module_dict:
                downstream.register_module(name=name, module=cls)
        mirrored.append(downstream.scope)
    return mirrored


def acmix_model_names() -> list[str]:
    """Names of every model type that acmix_mm registers."""
    MODELS.import_from_location()
    return sorted(MODELS.module_dict)


def unknown_type_hint(type_name: str) -> str:
    """A sentence for an error about an unknown model type: close matches and the ACMix types."""
    bare = type_name.split('.', 1)[-1]
    names = acmix_model_names()
    close = close_matches(bare, names)
    hint = f'acmix_mm registers these model types: {", ".join(names)}.'
    if close:
        hint = f'Did you mean {" or ".join(repr(c) for c in close)}? ' + hint
    return hint


def close_matches(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The candidates closest to ``word`` (difflib ratio >= 0.6), best first."""
    return difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.6)


def unknown_keys_message(owner: str, unknown: Iterable[str], allowed: Sequence[str],
                         noun: str = 'argument') -> str:
    """A sentence for keys that ``owner`` does not take: each key, its closest match, the allowed keys.

    Example: ``backbone ResNetACMix got unknown argument 'depht' (did you mean 'depth'?);
    allowed: depth, in_channels, ...``.
    """
    unknown = list(unknown)
    named = []
    for key in unknown:
        close = close_matches(str(key), allowed, n=1)
        named.append(f'{key!r}' + (f' (did you mean {close[0]!r}?)' if close else ''))
    noun = noun if len(unknown) == 1 else noun + 's'
    return f'{owner} got unknown {noun} {", ".join(named)}; allowed: {", ".join(allowed)}'


_UNKNOWN_TYPE = re.compile(r'(\S+) is not in the \S* ?registry')


def build_model(cfg: dict, registry: Optional[Registry] = None):
    """Build a model from its config; an unknown ``type`` raises a KeyError naming acmix_mm's types.

    Args:
        cfg: a model config (a plain dict is turned into a ``ConfigDict``, as mmengine expects).
        registry: where to build from; None means acmix_mm's ``MODELS`` (which also reaches every
            mmengine-rooted registry through scope prefixes such as ``mmdet.``).
    """
    from mmengine.config import ConfigDict

    if not isinstance(cfg, dict):
        raise TypeError(f'a model config must be a dict, got {type(cfg).__name__}')
    if not isinstance(cfg, ConfigDict):
        cfg = ConfigDict(cfg)
    registry = MODELS if registry is None else registry
    try:
        return registry.build(cfg)
    except KeyError as err:
        message = str(err.args[0]) if err.args else ''
        match = _UNKNOWN_TYPE.search(message)
        if match is None:
            raise
        raise KeyError(f'{message}\n{unknown_type_hint(match.group(1))}') from err
