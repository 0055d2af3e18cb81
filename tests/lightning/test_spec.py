"""RunSpec: the config is parsed and checked once, and the parts take what it holds."""
import dataclasses
import warnings

import pytest

from acmix_mm.lightning import MMDataModule, MMLightningModule, RunSpec, TrainerOverrides, build_trainer

from .helpers import tiny_maskrcnn_config


def _amp(cfg):
    cfg.optim_wrapper = dict(type='AmpOptimWrapper', optimizer=dict(type='SGD', lr=0.01), accumulative_counts=3)
    return cfg


def test_spec_holds_every_parsed_setting(coco_root, tmp_path):
    cfg = tiny_maskrcnn_config(coco_root, max_iters=4)
    cfg.randomness = dict(seed=5, deterministic='warn', diff_rank_seed=True)
    cfg.default_hooks = dict(logger=dict(type='LoggerHook', interval=3),
                             checkpoint=dict(type='CheckpointHook', max_keep_ckpts=2))
    cfg.lightning = dict(nan_policy='skip', loggers='csv')
    spec = RunSpec.from_config(cfg, work_dir=str(tmp_path), overrides=TrainerOverrides(devices=1, max_steps=7))
    assert (spec.stage, spec.work_dir, spec.seed) == ('fit', str(tmp_path), 5)
    assert (spec.loop.by_epoch, spec.loop.max_iters) == (False, 7)
    assert spec.lightning.nan_policy == 'skip' and spec.lightning.loggers == ('csv',)
    assert (spec.deterministic, spec.diff_rank_seed, spec.log_every_n_steps) == ('warn', True, 3)
    # max_keep_ckpts=2 keeps the newest two, ranked by step, as mmengine does.
    assert (spec.checkpoint.save_top_k, spec.checkpoint.monitor, spec.checkpoint.mode) == (2, 'step', 'max')
    assert spec.checkpoint_dir == str(tmp_path / 'checkpoints')
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 6
    # --seed wins over randomness.seed.
    assert RunSpec.from_config(cfg, seed=9).seed == 9


def test_precision_precedence(coco_root):
    cfg = _amp(tiny_maskrcnn_config(coco_root))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        derived = RunSpec.from_config(cfg, overrides=TrainerOverrides(accelerator='cpu'))
    # float16 AMP is GPU-only in Lightning: on CPU it becomes bf16 with a warning.
    assert derived.precision == 'bf16-mixed' and any('bf16-mixed' in str(w.message) for w in caught)
    assert derived.optim.accumulate_grad_batches == 3
    cfg.lightning = dict(precision='64-true')
    assert RunSpec.from_config(cfg).precision == '64-true'
    cli = RunSpec.from_config(cfg, overrides=TrainerOverrides(precision='32-true'))
    assert cli.precision == '32-true'


def test_parts_do_not_parse_the_config_again(coco_root, tmp_path):
    cfg = tiny_maskrcnn_config(coco_root, max_iters=2)
    spec = RunSpec.from_config(cfg, work_dir=str(tmp_path))
    # Spoil the raw keys after parsing: the parts read the spec, never these.
    cfg.lightning = dict(nan_policy='explode', sync_bn='never', per_sample_seed=False)
    cfg.train_cfg = dict(type='NoSuchLoop')
    with pytest.raises(ValueError, match="nan_policy='explode'"):
        RunSpec.from_config(cfg)
    module = MMLightningModule(cfg, spec, init_weights=False)
    data = MMDataModule(cfg, spec)
    trainer = build_trainer(spec, accelerator='cpu', enable_progress_bar=False)
    assert module.spec is spec and data.spec is spec
    assert (module.nan_policy, module.sync_bn, data.per_sample_seed) == ('raise', 'auto', True)
    assert module.loop_spec().max_iters == 2 and trainer.max_steps == 2
    with pytest.raises(ValueError, match='a spec or a seed, not both'):
        MMDataModule(cfg, spec, seed=1)


def test_test_stage_trainer_takes_the_same_settings(coco_root, tmp_path):
    # tools/test.py builds its Trainer through build_trainer too: optim_wrapper's precision and the
    # section's trainer_kwargs reach it, and training-only settings do not.
    cfg = _amp(tiny_maskrcnn_config(coco_root))
    cfg.lightning = dict(trainer_kwargs=dict(limit_test_batches=2), enable_progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        spec = RunSpec.from_config(cfg, 'test', work_dir=str(tmp_path), overrides=TrainerOverrides(accelerator='cpu'))
    assert spec.loop is None and spec.validates is False
    trainer = build_trainer(spec, logger=False, enable_checkpointing=False)
    assert trainer.precision == 'bf16-mixed'
    assert trainer.limit_test_batches == 2
    assert trainer.checkpoint_callback is None
