"""Bad inputs that reach train(): each fails with its message before the work dir exists."""
import json
import pytest
from .test_bad_inputs import Ctx, ctx, clean_coco, run_train, with_lightning  # noqa: F401


def _truncated(ctx):
    path = ctx.root / 'annotations' / 'instances_train.json'
    text = path.read_text()
    path.write_text(text[:len(text) // 2])
    ctx.cfg.train_dataloader.dataset.type = 'acmix_mm.CheckedCocoDataset'
    run_train(ctx)


def _empty(ctx):
    data = ctx.ann()
    data['annotations'] = []
    ctx.write_ann(data)
    run_train(ctx)


@pytest.mark.parametrize('action, error, match', [
    (with_lightning(devices='many'), ValueError, r"lightning\.devices='many' is not valid"),
    (lambda c: (c.cfg.__setitem__('lightning', [dict(devices=2)]), run_train(c)), TypeError, 'must be a dict'),
    (with_lightning(checkpoint=['last']), TypeError, r'lightning\.checkpoint must be a dict'),
    (with_lightning(enable_progress_bar='no'), TypeError, r'enable_progress_bar must be True or False'),
    (_truncated, ValueError, 'is not valid JSON'),
    (_empty, ValueError, r'train_dataloader\.dataset is empty: CocoDataset'),
])
def test_through_train(ctx, action, error, match):
    with pytest.raises(error, match=match):
        action(ctx)
    assert not ctx.work_dir.exists()
