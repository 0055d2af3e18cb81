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
    (with_lightning(check_data='yes'), TypeError, r"lightning\.check_data must be True or False, got 'yes'"),
    (_truncated, ValueError, 'is not valid JSON'),
    # (mmdet alone filters every image out, and the message would blame the filter or the images)
    (_empty, ValueError, r"no usable annotation of the classes \('square', 'bar'\) in '.*instances_train\.json' "
                         r'to train on \(skipped 0 of 0 annotations; filter_cfg=.* kept 0 of 4 images\)'),
])
def test_through_train(ctx, action, error, match):
    with pytest.raises(error, match=match):
        action(ctx)
    assert not ctx.work_dir.exists()


def _set(path: str, value):
    """A row that sets ``cfg.<path> = value`` and trains."""
    def run(ctx):
        node = ctx.cfg
        *parents, leaf = path.split('.')
        for key in parents:
            node = node[key]
        node[leaf] = value
        run_train(ctx)
    return run


# Each of these used to fail inside trainer.fit (torch's or the DataLoader's message, naming no
# key) after the work dir, the config copy and the loggers' folders were written.
@pytest.mark.parametrize('action, message', [
    (_set('optim_wrapper.optimizer.lr', 'abc'),
     "optim_wrapper.optimizer.lr='abc' must be a finite number >= 0"),
    (_set('optim_wrapper.optimizer.lr', -0.1),
     'optim_wrapper.optimizer.lr=-0.1 must be a finite number >= 0'),
    (_set('optim_wrapper.optimizer.weight_decay', float('nan')),
     'optim_wrapper.optimizer.weight_decay=nan must be a finite number >= 0'),
    (_set('optim_wrapper.optimizer.betas', (0.9, 1.5)),
     'optim_wrapper.optimizer.betas=(0.9, 1.5) must be two numbers in [0, 1)'),
    (_set('train_dataloader.batch_size', 0), 'train_dataloader.batch_size=0 must be an integer >= 1'),
    (_set('train_dataloader.num_workers', -1), 'train_dataloader.num_workers=-1 must be an integer >= 0'),
    (_set('val_dataloader.batch_size', 2.5), 'val_dataloader.batch_size=2.5 must be an integer >= 1'),
])
def test_checked_before_output(ctx, action, message):
    with pytest.raises(ValueError) as info:
        action(ctx)
    assert str(info.value) == message
    assert not ctx.work_dir.exists()
