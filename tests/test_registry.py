"""Registry behaviour: both config styles in mmdet's and mmseg's scopes, no-mmdet installs, errors.

The import-order tests run in fresh interpreters: the point is what happens when *nothing* has
imported acmix_mm yet, which the pytest process (where other tests import it) cannot show.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mmengine.config import Config
from mmengine.registry import DefaultScope

import acmix_mm
from acmix_mm.models.backbones.resnet_acmix import ResNetACMix
from acmix_mm.registry import MODELS, acmix_model_names, build_model, unknown_type_hint

REPO = Path(__file__).resolve().parents[1]
SLIM = "depth=26, base_channels=16, out_indices=(3,)"


def run_fresh(code: str) -> str:
    """Run ``code`` in a new interpreter from the repository root; return its stdout."""
    proc = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
def test_prefixed_type_builds_without_custom_imports(scope):
    out = run_fresh(f"""
        import sys
        import torch
        from mmengine.registry import init_default_scope
        from {scope}.registry import MODELS
        assert not any(m == 'acmix_mm' or m.startswith('acmix_mm.') for m in sys.modules)
        init_default_scope('{scope}')
        model = MODELS.build(dict(type='acmix_mm.ResNetACMix', {SLIM}))
        assert type(model).__module__ == 'acmix_mm.models.backbones.resnet_acmix', type(model)
        print(type(model).__name__, tuple(model.eval()(torch.zeros(1, 3, 64, 64))[0].shape))
    """)
    assert out.split() == ['ResNetACMix', '(1,', '512,', '2,', '2)']


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
def test_custom_imports_with_bare_type(scope, tmp_path):
    cfg_file = tmp_path / 'cfg.py'
    cfg_file.write_text(textwrap.dedent(f"""
        default_scope = '{scope}'
        custom_imports = dict(imports=['acmix_mm'], allow_failed_imports=False)
        backbone = dict(type='ResNetACMix', {SLIM})
    """))
    out = run_fresh(f"""
        import sys
        from mmengine.config import Config
        from mmengine.registry import init_default_scope
        from {scope}.registry import MODELS
        assert 'acmix_mm' not in sys.modules
        cfg = Config.fromfile({str(cfg_file)!r})  # imports custom_imports, as the runner does
        assert 'acmix_mm' in sys.modules
        init_default_scope(cfg.default_scope)
        model = MODELS.build(cfg.backbone)
        print(type(model).__module__, type(model).__name__)
    """)
    assert out.split() == ['acmix_mm.models.backbones.resnet_acmix', 'ResNetACMix']


def test_package_imports_and_builds_without_mmdet_mmseg_mmcv():
    out = run_fresh(f"""
        import sys

        class BlockOpenMMLabDownstream:
            # Pretend only torch + mmengine are installed.
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('mmdet', 'mmseg', 'mmcv'):
                    raise ImportError(f'{{name}} is blocked in this test')
                return None

        sys.meta_path.insert(0, BlockOpenMMLabDownstream())
        import acmix_mm
        from acmix_mm.registry import MODELS, mirror_into_openmmlab
        assert mirror_into_openmmlab() == []
        prefixed = MODELS.build(dict(type='acmix_mm.ResNetACMix', {SLIM}))
        bare = MODELS.build(dict(type='ResNetACMix', {SLIM}))
        assert type(prefixed) is type(bare)
        leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('mmdet', 'mmseg', 'mmcv'))
        print(type(bare).__name__, leaked)
    """)
    assert out.strip() == 'ResNetACMix []'


def test_models_are_mirrored_into_mmdet_and_mmseg():
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmseg.registry import MODELS as MMSEG_MODELS
    assert MMDET_MODELS.get('ResNetACMix') is ResNetACMix
    assert MMSEG_MODELS.get('ResNetACMix') is ResNetACMix
    assert MODELS.get('ResNetACMix') is ResNetACMix
    # Idempotent: a second call must not raise "already registered".
    assert sorted(acmix_mm.registry.mirror_into_openmmlab()) == ['mmdet', 'mmseg']


def test_model_names_and_hint():
    assert 'ResNetACMix' in acmix_model_names()
    hint = unknown_type_hint('acmix_mm.ResNetACMx')
    assert hint.startswith("Did you mean 'ResNetACMix'")
    assert 'acmix_mm registers these model types:' in hint and 'ResNetACMix' in hint
    assert 'Did you mean' not in unknown_type_hint('Completely')


def test_build_model_builds_from_plain_dict():
    model = build_model(dict(type='ResNetACMix', depth=26, base_channels=16))
    assert isinstance(model, ResNetACMix) and model.base_channels == 16


@pytest.mark.parametrize('type_name', ['ResNetACMx', 'acmix_mm.ResnetACMix'])
def test_build_model_misspelt_type_lists_acmix_types(type_name):
    with pytest.raises(KeyError) as info:
        build_model(dict(type=type_name, depth=26))
    message = str(info.value)
    assert type_name in message and 'is not in the' in message
    assert "Did you mean 'ResNetACMix'" in message
    assert 'acmix_mm registers these model types:' in message


def test_build_model_misspelt_nested_backbone_in_mmdet_scope():
    cfg = Config.fromfile(str(REPO / 'configs/acmix_resnet/retinanet_acmix-r50_fpn_1x_coco.py'))
    cfg.model.backbone.type = 'ResNetACMIX'
    from mmdet.registry import MODELS as MMDET_MODELS
    with DefaultScope.overwrite_default_scope('mmdet'):
        with pytest.raises(KeyError) as info:
            build_model(cfg.model, registry=MMDET_MODELS)
    assert "Did you mean 'ResNetACMix'" in str(info.value)


def test_build_model_does_not_hide_other_errors():
    with pytest.raises(ValueError, match='invalid depth 34'):
        build_model(dict(type='ResNetACMix', depth=34))
    with pytest.raises(TypeError, match='must be a dict'):
        build_model(['ResNetACMix'])
