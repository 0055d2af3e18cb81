# CPU demo: Semantic FPN on a slim ResNet-ACMix-26 (base width 16, ACMix in stages 3-4), on
# ADE20K-layout synthetic scenes (tools/make_demo_data.py ade). Trains from scratch on 2 CPU cores
# in about 3.2 minutes: mIoU 63.3 on the 40 validation scenes after 1400 iterations (untrained:
# 8.5; demo floor 30). Numbers and the recipes tried: docs/benchmarks.md#the-demos.
#
# ACMix: Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022.
# Everything but the sizes is mmseg's Semantic FPN + ADE20K setup, inherited from mmseg's bases:
# EncoderDecoder + FPN + FPNHead, reduce_zero_label=True (stored 0 = ignore, 1..K = classes),
# IoUMetric (mIoU/mAcc/aAcc). The dataset is mmseg's ADE20KDataset with checked folders and the
# demo's own class names (acmix_mm.ADE20KLayoutDataset); the acmix_mm.Check* transforms stop at a
# label PNG whose size or values are wrong.
#
#   make demo-seg           (tools/demo.py seg [--data-root DIR]: data, train, test, figures)
#   python tools/train.py configs/demo/semfpn_acmix-r26-slim_shapes-ade.py
#   python tools/test.py configs/demo/semfpn_acmix-r26-slim_shapes-ade.py CKPT --out PRED_DIR
# mmengine resolves data_root when it reads this file: to move the data, pass
#   --cfg-options {train,val,test}_dataloader.dataset.data_root=DIR  (each of the three).
_base_ = [
    'mmseg::_base_/models/fpn_r50.py', 'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py'
]
# (_base_ must come first: mmengine treats a config that starts with an import as a lazy config.)
from acmix_mm.datasets.synthetic import ADE_CLASSES, ADE_PALETTE

data_root = 'data/demo/shapes-ade'
# Stored labels 1..K name ADE_CLASSES in order (0 = clutter, ignored).
num_classes = len(ADE_CLASSES)
# Training crops are whole images: a smaller crop cut the larger shapes, whose class is their
# outline (docs/benchmarks.md). The scale keeps the 128 px images at their size (keep_ratio).
crop_size = (128, 128)
img_scale = (128, 128)
norm_cfg = dict(type='BN', requires_grad=True)  # one process on CPU: no SyncBN needed

data_preprocessor = dict(
    size=crop_size,  # training batches are padded to the crop (label padding: 255 = ignore)
    test_cfg=dict(size_divisor=32))  # test images are padded to a multiple of the stride 32
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,  # the base names open-mmlab://resnet50_v1c, another network
    backbone=dict(
        _delete_=True,  # mmseg's ResNetV1c arguments are replaced, not merged
        type='acmix_mm.ResNetACMix',
        depth=26,
        base_channels=16,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        strides=(1, 2, 2, 2),
        norm_cfg=norm_cfg,
        norm_eval=False,
        style='pytorch',
        # ACMix where maps are small (stages 3-4: 8x8 and 4x4 at 128 px), as in the detection
        # demo: plain 3x3 convs at 32x32 and 16x16 make a step about a fifth cheaper.
        acmix_stages=(False, False, True, True)),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=64, num_outs=4),
    decode_head=dict(
        in_channels=[64, 64, 64, 64],
        channels=64,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        dropout_ratio=0.0),
    test_cfg=dict(mode='whole'))

load_checks = [
    dict(type='acmix_mm.CheckSegMapSize'),
    dict(type='acmix_mm.CheckSegLabels', num_classes=num_classes, ignore_index=255),
]
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    *load_checks,
    dict(type='RandomResize', scale=img_scale, ratio_range=(0.75, 1.25), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    # labels are loaded after the resize: the metric compares at the image's own size
    dict(type='LoadAnnotations', reduce_zero_label=True),
    *load_checks,
    dict(type='PackSegInputs'),
]
dataset_type = 'acmix_mm.ADE20KLayoutDataset'
metainfo = dict(classes=ADE_CLASSES, palette=ADE_PALETTE)
train_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    # mmengine's InfiniteSampler iterates one generator for its lifetime: a loop that re-iterates
    # the dataloader every epoch (Lightning) gets empty epochs after the first. DefaultSampler
    # reshuffles per epoch and serves an iteration-based loop just as well.
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

max_iters = 1400
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=4e-3, betas=(0.9, 0.999), weight_decay=0.01))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=50),
    dict(type='PolyLR', eta_min=1e-5, power=0.9, by_epoch=False, begin=50, end=max_iters),
]
# Four points on the demo's mIoU curve (40 images: about 3 s each).
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=350)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=20, log_metric_by_epoch=False),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters),
    visualization=dict(type='SegVisualizationHook', draw=False))
randomness = dict(seed=0)
