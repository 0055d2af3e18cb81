"""What the ACMix backbones share: ``init_weights`` that honours ``init_cfg`` and keeps the shift init."""
from __future__ import annotations

import logging

from mmengine.logging import print_log
from mmengine.model import BaseModule


class ACMixBackbone(BaseModule):
    """Base of the ACMix backbones.

    ``init_weights`` runs, in order: the backbone's own default init (``_default_init``); any
    non-``Pretrained`` mmengine initialisers in ``init_cfg``, after which ACMix's shift init is
    re-applied (``_reset_acmix``) because generic ``Conv2d`` initialisers would overwrite it (the
    authors' ResNet lost it that way); then every ``Pretrained`` entry through the backbone's
    ``load_pretrained``, which uses acmix_mm's safe loader instead of mmengine's (the authors'
    files hold a pickled yacs ``CfgNode`` that ``torch.load(weights_only=True)`` refuses).

    Subclasses implement ``_default_init()``, ``_reset_acmix()`` and ``load_pretrained(path)``.
    """

    def init_weights(self) -> None:
        """Initialise as ``init_cfg`` says (see the class docstring)."""
        if self._is_init:
            print_log(f'init_weights of {type(self).__name__} has been called more than once.',
                      logger='current', level=logging.WARNING)
            return
        cfgs = self.init_cfg if isinstance(self.init_cfg, list) else [self.init_cfg]
        for cfg in cfgs:
            if cfg is not None and not (isinstance(cfg, dict) and 'type' in cfg):
                raise TypeError(f'each init_cfg must be a dict with a "type" key, got {cfg!r}')
        pretrained = [c for c in cfgs if c is not None and c['type'] == 'Pretrained']
        others = [c for c in cfgs if c is not None and c['type'] != 'Pretrained']
        self._default_init()
        if others:
            init_cfg, self.init_cfg = self.init_cfg, others
            super().init_weights()
            self.init_cfg = init_cfg
            self._reset_acmix()
        for cfg in pretrained:
            if 'checkpoint' not in cfg:
                raise ValueError(f'init_cfg {cfg!r} needs a checkpoint path')
            self.load_pretrained(cfg['checkpoint'])
        self._is_init = True

    def _default_init(self) -> None:
        raise NotImplementedError

    def _reset_acmix(self) -> None:
        raise NotImplementedError

    def load_pretrained(self, path: str):
        raise NotImplementedError
