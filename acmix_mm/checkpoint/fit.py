"""Does a state_dict fit a model? One check, and one "does not fit" message, for every loader."""
from __future__ import annotations

import collections
from typing import List, Mapping, Sequence

import torch

from .safe import CheckpointError, short_list

__all__ = ['check_state_dict_fits', 'check_model_fits']


def _by_component(keys: Sequence[str]) -> str:
    """``neck.* 12, roi_head.* 40``: how many keys each top-level component holds."""
    counts = collections.Counter(k.split('.', 1)[0] + ('.*' if '.' in k else '') for k in keys)
    return ', '.join(f'{name} {n}' for name, n in counts.most_common(6)) + (
        ', ...' if len(counts) > 6 else '')


def check_state_dict_fits(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor],
                          path: str, target: str, allow_missing: Sequence[str] = (),
                          limit: int = 10) -> List[str]:
    """Check that the checkpoint ``found`` holds exactly the tensors of ``expected``.

    Args:
        expected: the model's state_dict (names -> tensors).
        found: the file's state_dict, after layout and key conversion.
        path: the file, for the message.
        target: what it is loaded into, e.g. ``'ResNetACMix'`` or ``'MaskRCNN'``.
        allow_missing: prefixes of model keys the file may lack (they keep their values).
        limit: keys listed per category in the message.

    Returns:
        The model keys missing from the file that ``allow_missing`` allows.

    Raises:
        CheckpointError: keys missing or unexpected, or shapes that differ: the message lists
            them, with a count per top-level component (``neck.* 12``) to tell another
            architecture (different components) from another configuration (same keys,
            other shapes).
    """
    missing = [k for k in expected if k not in found]
    not_allowed = [k for k in missing if not any(k.startswith(p) for p in allow_missing)]
    unexpected = [k for k in found if k not in expected]
    shapes = [f'{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}'
              for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k].shape)]
    problems = []
    for title, items, grouped in (('model keys missing from the checkpoint', not_allowed, True),
                                  ('checkpoint keys not in the model', unexpected, True),
                                  ('shape mismatches', shapes, False)):
        if items:
            groups = f' ({_by_component(items)})' if grouped else ''
            problems.append(f'{len(items)} {title}{groups}: {short_list(items, limit)}')
    if problems:
        raise CheckpointError(
            f'checkpoint {path!r} does not fit {target} (a checkpoint of another model or '
            f'configuration?): ' + '; '.join(problems))
    return missing



def check_model_fits(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                     limit: int = 10) -> None:
    """:func:`check_state_dict_fits` of ``model``'s own state_dict (nothing may be missing).

    Raises:
        CheckpointError: keys missing or unexpected, or shapes that differ (listed).
    """
    check_state_dict_fits(model.state_dict(), state_dict, source, type(model).__name__, limit=limit)
