"""SwinACMix: the authors' weights and outputs, parameter counts, any input size, freezing,
gradient checkpointing, acmix_stages, the small-map rule, argument errors."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from yacs.config import CfgNode

from acmix_mm.models.backbones.swin_acmix import (ACMixWindowAttention, SwinACMix, SwinACMixBlock,
                                                  relative_position_index)
from acmix_mm.registry import build_model
from tests.reference.swin_acmix_authors import SwinACmixAuthors

SMALL = dict(embed_dims=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def small(**kwargs) -> SwinACMix:
    torch.manual_seed(0)
    model = SwinACMix(kwargs.pop('arch', SMALL), **kwargs)
    model.init_weights()
    return model


def head_params(num_features: int, classes: int = 1000) -> int:
    return num_features * classes + classes


# --------------------------------------------------------------------------- sizes
def test_tiny_parameter_count_matches_the_authors():
    authors = SwinACmixAuthors()  # Swin-T, 1000-class head, final norm
    assert n_params(authors) == 28_649_908
    backbone = SwinACMix('tiny', out_indices=(3,))  # norm3 is the final norm, no head
    assert n_params(backbone) == 28_649_908 - head_params(768)
    # every output gets its norm: norm0..norm2 add 2 * (96 + 192 + 384)
    assert n_params(SwinACMix('tiny')) == 28_649_908 - head_params(768) + 2 * (96 + 192 + 384)


def test_small_parameter_count_matches_the_authors():
    authors = sum(p.numel() for p in SwinACmixAuthors(depths=(2, 2, 18, 2)).parameters())
    assert round(authors / 1e6, 2) == 50.35
    assert n_params(SwinACMix('small', out_indices=(3,))) == authors - head_params(768)


# --------------------------------------------------------------------------- the authors
def randomised_authors(seed: int = 0) -> SwinACmixAuthors:
    torch.manual_seed(seed)
    authors = SwinACmixAuthors(SMALL['embed_dims'], SMALL['depths'], SMALL['num_heads'],
                               num_classes=10).eval()
    with torch.no_grad():  # move every weight off its init so that each one is tested
        for p in authors.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return authors


def save_like_the_authors(authors: nn.Module, path) -> str:
    cfg = CfgNode()
    cfg.MODEL = CfgNode()
    cfg.MODEL.TYPE = 'swin_acmix'
    cfg.DATA = CfgNode()
    cfg.DATA.IMG_SIZE = 224
    cfg.freeze()
    torch.save({'model': authors.state_dict(), 'optimizer': {'state': {}, 'param_groups': []},
                'lr_scheduler': {}, 'max_accuracy': 80.0, 'epoch': 299, 'config': cfg}, path)
    return str(path)


def test_authors_checkpoint_reproduces_their_features(tmp_path):
    authors = randomised_authors()
    path = save_like_the_authors(authors, tmp_path / 'swin_acmix_t.pth')
    model = SwinACMix(SMALL, out_indices=(3,), init_cfg=dict(type='Pretrained', checkpoint=path))
    model.init_weights()
    model.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = authors.forward_features(x)
        (out,) = model(x)
    assert out.shape == (2, 192, 7, 7)
    assert torch.allclose(out.mean((2, 3)), expected, atol=1e-4)
    assert expected.std() > 0.1  # a real signal, not a collapsed map


def test_small_map_rule_is_the_authors_at_224():
    block = SwinACMixBlock(32, 2, window_size=7, shift=True)
    assert block.window_and_shift((56, 56)) == ((7, 7), 3)
    assert block.window_and_shift((7, 7)) == ((7, 7), 0)  # authors: window = map, no shift
    assert block.window_and_shift((5, 3)) == ((5, 3), 0)  # one window, no padding
    assert block.window_and_shift((5, 9)) == ((7, 7), 3)  # mmdet: padded to 7x14, shifted
    assert SwinACMixBlock(32, 2, shift=False).window_and_shift((20, 20)) == ((7, 7), 0)


def test_relative_position_index_of_a_smaller_window_reads_the_same_offsets():
    full = relative_position_index(7, 7, 7)
    sub = relative_position_index(3, 2, 7)
    # token (y, x) of a 3x2 window is token 7*y + x of the 7x7 one
    ids = torch.tensor([7 * y + x for y in range(3) for x in range(2)])
    assert torch.equal(sub, full[ids][:, ids])


# --------------------------------------------------------------------------- any input size
@pytest.mark.parametrize('size', [(37, 53), (64, 96), (20, 20), (9, 70)])
def test_outputs_at_odd_sizes(size):
    model = small()
    model.eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    assert len(outs) == 4
    for i, out in enumerate(outs):
        stride = 4 * 2 ** i
        assert out.shape == (1, 24 * 2 ** i, math.ceil(size[0] / stride), math.ceil(size[1] / stride))
        assert torch.isfinite(out).all()


def test_padding_does_not_leak_into_the_conv_branch():
    """Conv branch at real pixels sees zeros where the map was padded: a one-window map (no
    padding) and a padded map agree on the part they share only through the attention."""
    torch.manual_seed(0)
    attn = ACMixWindowAttention(8, 2, window_size=4).eval()
    nn.init.normal_(attn.fc.bias)
    x = torch.randn(1, 6, 6, 8)
    qkv = attn.qkv(nn.functional.pad(x, (0, 0, 0, 2, 0, 2)))
    valid = torch.zeros(8, 8)
    valid[:6, :6] = 1
    padded = attn._convolution(qkv, valid)[:, :6, :6]
    direct = attn._convolution(attn.qkv(x), None)
    assert torch.allclose(padded, direct, atol=1e-5)


def test_build_from_registry_and_init():
    model = build_model(dict(type='acmix_mm.SwinACMix', arch=SMALL, out_indices=(0, 3)))
    model.init_weights()
    attn = model.stages[1].blocks[0].attn
    assert attn.rate1.item() == 0.5 and attn.rate2.item() == 0.5
    shift = attn.dep_conv.weight  # (C, 9, 3, 3): tap t is a one-hot kernel at (t // 3, t % 3)
    assert torch.equal(shift.sum((2, 3)), torch.ones(48, 9))
    assert all(shift[:, t, t // 3, t % 3].eq(1).all() for t in range(9))


# --------------------------------------------------------------------------- training options
def test_frozen_stages():
    model = small(frozen_stages=2, out_indices=(0, 1, 2, 3))
    model.train()
    frozen = [model.patch_embed, model.stages[0], model.stages[1], model.norm0, model.norm1]
    for m in frozen:
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    for m in (model.stages[2], model.stages[3], model.norm2, model.norm3):
        assert m.training and all(p.requires_grad for p in m.parameters())
    x = torch.randn(1, 3, 32, 40)
    sum(o.sum() for o in model(x)).backward()
    assert model.stages[0].blocks[0].attn.qkv.weight.grad is None
    assert model.stages[2].blocks[0].attn.dep_conv.weight.grad is not None


def test_with_cp_gives_equal_gradients():
    grads = []
    for with_cp in (False, True):
        model = small(with_cp=with_cp, drop_path_rate=0.0)
        model.train()
        x = torch.randn(2, 3, 36, 44, generator=torch.Generator().manual_seed(3))
        sum((o ** 2).mean() for o in model(x)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6, rtol=1e-5), name


def test_acmix_stages_switch_the_conv_branch():
    model = small(acmix_stages=(2, 3))
    names = set(dict(model.named_parameters()))
    assert 'stages.0.blocks.0.attn.fc.weight' not in names
    assert 'stages.1.blocks.1.attn.rate1' not in names
    assert 'stages.2.blocks.0.attn.dep_conv.weight' in names
    assert 'stages.0.blocks.0.attn.relative_position_bias_table' in names
    full = small()
    per_block = lambda dim, heads: 2 + 9 * 3 * heads + 9 + dim * 9 * 9  # rates, fc, dep_conv
    assert n_params(full) - n_params(model) == 2 * (per_block(24, 1) + per_block(48, 2))
    # without ACMix anywhere the block is plain Swin attention: proj(attn) only
    plain = small(acmix_stages=())
    assert not any(isinstance(getattr(m, 'fc', None), nn.Conv2d) for m in plain.modules()
                   if isinstance(m, ACMixWindowAttention))


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(arch='huge'), ValueError, "arch 'huge' is not one of \\['small', 'tiny'\\]"),
    (dict(arch=dict(embed_dims=24, depths=(2,))), ValueError, 'needs exactly the keys'),
    (dict(arch=dict(embed_dims=24, depths=(2, 2), num_heads=(5, 2)), out_indices=(0, 1)), ValueError,
     'not divisible'),
    (dict(out_indices=(4,)), ValueError, 'out_indices must be a non-empty subset of 0..3'),
    (dict(frozen_stages=5), ValueError, 'frozen_stages must be in -1..4, got 5'),
    (dict(acmix_stages=(0, 7)), ValueError, 'acmix_stages must be a subset of 0..3'),
    (dict(window_size=0), ValueError, 'window_size must be an int >= 1'),
    (dict(drop_path_rate=1.5), ValueError, 'drop_path_rate must be in'),
    (dict(pretrained='a.pth', init_cfg=dict(type='Pretrained', checkpoint='b.pth')), ValueError,
     'either pretrained or init_cfg'),
])
def test_argument_errors(kwargs, error, match):
    kwargs = {'arch': SMALL, **kwargs}
    with pytest.raises(error, match=match):
        SwinACMix(**kwargs)


def test_input_errors():
    model = small()
    with pytest.raises(ValueError, match=r'expects a \(B, 3, H, W\) input, got shape \(1, 1, 32, 32\)'):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match='needs a checkpoint path'):
        SwinACMix(SMALL, init_cfg=dict(type='Pretrained')).init_weights()
