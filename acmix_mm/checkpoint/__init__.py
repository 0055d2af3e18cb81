"""Reading and writing weights, for every caller of acmix_mm (torch and mmengine only).

* :mod:`.safe`: the safe unpickler; :func:`safe_load` (nothing in a file ever runs) and
  :func:`load_checkpoint_dict`.
* :mod:`.layouts`: the key layouts (the authors' files, stock ResNets, mmengine and Lightning
  wrappers) and their conversions; :class:`LoadReport`.
* :mod:`.fit`: does a state_dict fit a model? The one "does not fit" message.
* :mod:`.sources`: a path, ``torchvision://NAME`` or a URL -> a local file.
* :mod:`.loading`: :func:`load_backbone_weights`, :func:`load_model_weights`.
* :mod:`.atomic`: :func:`atomic_write`, used by every writer.
"""
from .atomic import atomic_directory, atomic_write, atomic_write_bytes, atomic_write_text
from .fit import check_model_fits, check_state_dict_fits
from .layouts import (LoadReport, backbone_state_dict, convert_resnet_authors, convert_swin_authors,
                      model_state_dict, take_replaced_convs)
from .loading import load_backbone_weights, load_model_weights
from .safe import CheckpointError, load_checkpoint_dict, safe_load
from .sources import resolve_checkpoint

__all__ = ['CheckpointError', 'LoadReport', 'safe_load', 'load_checkpoint_dict', 'backbone_state_dict',
           'model_state_dict', 'convert_swin_authors', 'convert_resnet_authors', 'take_replaced_convs',
           'check_state_dict_fits', 'check_model_fits', 'resolve_checkpoint', 'load_backbone_weights',
           'load_model_weights', 'atomic_write', 'atomic_write_bytes', 'atomic_write_text',
           'atomic_directory']
