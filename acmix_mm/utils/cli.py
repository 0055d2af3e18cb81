"""argparse value types shared by the command-line tools in ``tools/``."""
from __future__ import annotations

import argparse

__all__ = ['positive_int', 'non_negative_int']


def positive_int(text: str) -> int:
    """An int >= 1, or an argparse error naming the value."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be a positive int, got {text!r}')
    return value


def non_negative_int(text: str) -> int:
    """An int >= 0, or an argparse error naming the value."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be an int >= 0, got {text!r}')
    return value
