# CPU demo: Mask R-CNN on a slim ResNet-ACMix-26 (base width 16), trained from scratch on the
# COCO-format synthetic shapes (128 px, 1-4 shapes each; tools/demo.py det writes them), in about
# 5.5 minutes of training on 2 CPU cores: bbox / segm mAP 0.549 / 0.575 on the 40 validation
# images after 20 epochs (untrained: 0.000; demo floor 0.25). Numbers: docs/benchmarks.md.
#
# ACMix: Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022.
# Everything but the sizes is mmdet's Mask R-CNN R50-FPN 1x COCO setup, inherited from mmdet's
# config: RPN + RoIAlign + shared 2fc bbox head + 4conv mask head, CocoDataset, CocoMetric
# (bbox and segm mAP). The changes make it fit a CPU: 128 px images, a quarter-width backbone,
# 64-channel FPN and heads, anchors one octave smaller (objects are about 30-90 px), and fewer
# proposals and sampled RoIs (1-4 objects an image need few). mmcv's CPU RoIAlign dominates an
# iteration, so RoIs are few and sampled at 2x2 points per bin instead of adaptively.
#
#   make demo                                       (tools/demo.py det: data, train, test)
#   python tools/train.py configs/demo/maskrcnn_acmix-r26-slim_shapes-coco.py \
#       --cfg-options data_root=DIR                 (any folder written by make_demo_data.py coco)
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

data_root = 'data/demo/shapes-coco/'
# Category ids 1..4 in this order (acmix_mm.datasets.synthetic.COCO_CLASSES).
class_names = ('circle', 'triangle', 'rectangle', 'star')
num_classes = len(class_names)
img_scale = (128, 128)
norm_cfg = dict(type='BN', requires_grad=True)  # one process on CPU: no SyncBN needed
width = 64  # FPN and head channels

model = dict(
    backbone=dict(
        _delete_=True,  # mmdet's ResNet arguments are replaced, not merged
        type='acmix_mm.ResNetACMix',
        depth=26,
        base_channels=16,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,  # trained from scratch: nothing to freeze
        norm_cfg=norm_cfg,
        norm_eval=False,
        style='pytorch',
        # ACMix where maps are small (stages 3-4: 8x8 and 4x4 at 128 px): in stages 1-2 (32x32,
        # 16x16) its 7x7 attention would triple the backbone's CPU time.
        acmix_stages=(False, False, True, True),
        head=4),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=width, num_outs=5),
    rpn_head=dict(
        in_channels=width,
        feat_channels=width,
        anchor_generator=dict(scales=[4])),  # anchors 16..256 px over strides 4..64
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=width, roi_layer=dict(sampling_ratio=2)),
        bbox_head=dict(in_channels=width, fc_out_channels=256, num_classes=num_classes),
        # 7x7 mask RoIs upsampled to 14x14 masks (mmdet: 14 -> 28): a quarter of the mask head's
        # RoIAlign and convs, a third less time per step, the same mAP (docs/benchmarks.md).
        mask_roi_extractor=dict(out_channels=width,
                                roi_layer=dict(output_size=7, sampling_ratio=2)),
        mask_head=dict(roi_feat_size=7, in_channels=width, conv_out_channels=width,
                       num_classes=num_classes)),
    train_cfg=dict(
        rpn=dict(sampler=dict(num=64)),
        rpn_proposal=dict(nms_pre=300, max_per_img=64),
        # Half of the 32 sampled RoIs positive (mmdet: a quarter): with 1-4 objects an image the
        # classifier otherwise sees few positives; at a quarter it called squares circles.
        rcnn=dict(sampler=dict(num=32, pos_fraction=0.5), mask_size=14)),
    test_cfg=dict(
        rpn=dict(nms_pre=500, max_per_img=100),
        rcnn=dict(max_per_img=20)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
# One plain colour per class in drawn predictions (circle red, triangle green, rectangle blue,
# star gold): the class reads at a glance.
metainfo = dict(classes=class_names,
                palette=[(220, 20, 60), (0, 150, 70), (40, 90, 230), (255, 190, 0)])
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        # mmdet's CocoDataset plus file checks and a log line counting skipped annotations.
        type='acmix_mm.CheckedCocoDataset',
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='images/train/'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        type='acmix_mm.CheckedCocoDataset',
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='images/val/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

max_epochs = 20  # 2000 iterations of 4 images (400 training images)
train_cfg = dict(max_epochs=max_epochs, val_interval=2)  # 10 points on the mAP curve
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    # 1e-3: mAP rises steadily; 2e-3 swung between runs, 4e-3 stalls (docs/benchmarks.md)
    optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05),
    clip_grad=dict(max_norm=10.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type='CosineAnnealingLR', T_max=max_epochs, eta_min=1e-5, by_epoch=True, begin=0,
         end=max_epochs, convert_to_iter_based=True),
]
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10),
    checkpoint=dict(type='CheckpointHook', interval=max_epochs))
auto_scale_lr = dict(enable=False)
randomness = dict(seed=0)
