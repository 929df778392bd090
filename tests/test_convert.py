"""Checkpoint conversion (`vitdistill.convert`) and the variables directory format (`vitdistill.weights`)."""
import argparse
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitdistill.weights import load_variables, save_variables
from vitdistill.convert import from_torch, torch_key
from vitdistill.errors import CheckpointError
from vitdistill.models import create, create_dino

try:
    import timm
    import torch
except ImportError:
    torch = timm = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch/timm is not installed (pip install -e '.[torch]')")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_layout(variables) -> dict[str, np.ndarray]:
    """Flax variables -> a PyTorch-style state dict, by inverting the conversion rules."""
    flat = {}
    for path, value in jax.tree_util.tree_flatten_with_path(variables)[0]:
        path = tuple(entry.key for entry in path)
        value = np.asarray(value)
        value = value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1) if value.ndim == 4 else value
        flat[torch_key(path)] = value
    return flat


def run_convert(*args):
    result = subprocess.run([sys.executable, '-m', 'vitdistill.convert', *args], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def assert_close(actual, expected, atol=1e-4):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=0, atol=atol)


# ---------------------------------------------------------------------------
# Without torch: the rule table, mismatch errors, the directory format.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('name', ['resnet_micro', 'deit_micro_distilled_patch4_32'])
def test_round_trip_through_torch_layout(name):
    model = create(name)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    state_dict = torch_layout(variables)
    if name == 'resnet_micro':
        assert state_dict['layer2.0.downsample.0.weight'].shape == (64, 32, 1, 1)
        assert 'layer2.0.downsample.1.running_var' in state_dict
    converted = from_torch({'model': state_dict}, name)
    jax.tree.map(np.testing.assert_array_equal, converted, jax.device_get(variables))


def test_round_trip_dino_head_infers_its_shape():
    model = create_dino('vit_micro_patch4_32', out_dim=64, hidden_dim=32, bottleneck_dim=16, norm_last_layer=False)
    variables = jax.jit(model.init)(jax.random.key(0), [jnp.zeros((1, 32, 32, 3))])
    variables['params']['head']['last_layer']['weight_g'] *= 2.0  # a learned gain, as with norm_last_layer=False
    state_dict = torch_layout(variables)  # keys 'backbone.*' and 'head.*', as in MultiCropWrapper
    student = {f'module.{k}': v for k, v in state_dict.items()}
    converted = from_torch({'student': student, 'teacher': {}}, 'vit_micro_patch4_32', key='student', with_head=True)
    jax.tree.map(np.testing.assert_array_equal, converted, jax.device_get(variables))
    backbone_only = from_torch({'teacher': state_dict}, 'vit_micro_patch4_32')
    jax.tree.map(np.testing.assert_array_equal, backbone_only['params'],
                 jax.device_get(variables['params']['backbone']))


def test_mismatch_lists_missing_unexpected_and_misshaped_with_both_shapes():
    variables = jax.jit(create('deit_micro_patch4_32').init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    state_dict = torch_layout(variables)
    del state_dict['blocks.3.attn.qkv.weight']
    state_dict['extra.weight'] = np.zeros((3, 5), np.float32)
    with pytest.raises(ValueError) as error:
        from_torch(state_dict, 'deit_micro_patch4_32', num_classes=7)
    message = str(error.value)
    assert 'does not fit deit_micro_patch4_32 (4 problems)' in message
    assert 'missing     blocks.3.attn.qkv.weight -> params/blocks_3/attn/qkv/kernel [128, 384]' in message
    assert 'unexpected  extra.weight [3, 5] -> params/extra/kernel, not in deit_micro_patch4_32' in message
    assert ('mis-shaped  head.weight [10, 128] -> params/head/kernel [128, 10], '
            'deit_micro_patch4_32 expects [128, 7]') in message
    assert 'mis-shaped  head.bias [10] -> params/head/bias [10], deit_micro_patch4_32 expects [7]' in message


def test_path_without_torch_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, 'torch', None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[torch\]'"):
        from_torch(str(tmp_path / 'weights.pth'), 'deit_micro_patch4_32')


def test_load_variables_errors_say_what_was_expected(tmp_path):
    with pytest.raises(CheckpointError, match=r'no checkpoint directory.*python -m vitdistill\.convert'):
        load_variables(str(tmp_path / 'absent'))
    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'model.pth').write_text('')
    with pytest.raises(CheckpointError, match=r'not a vitdistill checkpoint.*found: model\.pth.*vitdistill\.convert'):
        load_variables(str(tmp_path / 'other'))

    variables = {'params': {'w': np.ones((2, 3), np.float32)}}
    save_variables(str(tmp_path / 'ok'), variables, model='deit_micro_patch4_32', source='test')
    restored = load_variables(str(tmp_path / 'ok'), model='deit_micro_patch4_32')
    np.testing.assert_array_equal(restored['params']['w'], variables['params']['w'])
    with pytest.raises(ValueError, match=r"'deit_micro_patch4_32', not 'resnet_micro'"):
        load_variables(str(tmp_path / 'ok'), model='resnet_micro')


# ---------------------------------------------------------------------------
# With torch: .pth files, the command line, and logits against timm.
# ---------------------------------------------------------------------------


class WritesAFile:
    """Unpickling this would open (create) a file: what a malicious checkpoint could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, 'w')


@needs_torch
def test_refuses_pickled_code(tmp_path):
    marker = tmp_path / 'marker'
    path = tmp_path / 'evil.pth'
    torch.save({'model': {'cls_token': torch.zeros(1, 1, 128)}, 'payload': WritesAFile(str(marker))}, path)
    with pytest.raises(ValueError, match=r'pickled objects other than tensors.*never unpickles.*plain state dict'):
        from_torch(str(path), 'deit_micro_patch4_32')
    assert not marker.exists()


@needs_torch
def test_cli_converts_deit_checkpoint(tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model('deit_tiny_patch16_224', pretrained=False).eval()
    torch.save({'model': reference.state_dict()}, tmp_path / 'deit.pth')
    stdout = run_convert(f'--checkpoint={tmp_path / "deit.pth"}', '--model=deit_tiny_patch16_224',
                         f'--output={tmp_path / "out"}')
    assert 'wrote' in stdout and 'deit_tiny_patch16_224' in stdout

    variables = load_variables(str(tmp_path / 'out'), model='deit_tiny_patch16_224')
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(images).numpy()
    nhwc = jnp.asarray(images.numpy().transpose(0, 2, 3, 1))
    actual = jax.jit(create('deit_tiny_patch16_224').apply)(variables, nhwc)
    assert_close(actual, expected)


def micro_vit():
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4, num_classes=0).eval()


@needs_torch
def test_cli_converts_dino_training_checkpoint(tmp_path):
    torch.manual_seed(0)
    teacher, student = micro_vit(), micro_vit()
    head = {'mlp.0.weight': torch.randn(32, 128) * 0.02, 'mlp.0.bias': torch.zeros(32),
            'mlp.2.weight': torch.randn(32, 32) * 0.02, 'mlp.2.bias': torch.zeros(32),
            'mlp.4.weight': torch.randn(16, 32) * 0.02, 'mlp.4.bias': torch.zeros(16),
            'last_layer.weight_g': torch.ones(64, 1), 'last_layer.weight_v': torch.randn(64, 16)}
    checkpoint = {
        'teacher': {**{f'backbone.{k}': v for k, v in teacher.state_dict().items()},
                    **{f'head.{k}': v for k, v in head.items()}},
        'student': {**{f'module.backbone.{k}': v for k, v in student.state_dict().items()},
                    **{f'module.head.{k}': v for k, v in head.items()}},
        'epoch': 10, 'args': argparse.Namespace(arch='vit_micro', out_dim=64),  # as saved by main_dino.py
    }
    torch.save(checkpoint, tmp_path / 'dino.pth')
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = create('vit_micro_patch4_32')

    run_convert(f'--checkpoint={tmp_path / "dino.pth"}', '--model=vit_micro_patch4_32', f'--output={tmp_path / "t"}')
    stdout = run_convert(f'--checkpoint={tmp_path / "dino.pth"}', '--model=vit_micro_patch4_32',
                         f'--output={tmp_path / "s"}', '--key=student', '--with_head')
    assert "'out_dim': 64" in stdout and "'norm_last_layer': True" in stdout

    for directory, reference in (('t', teacher), ('s', student)):
        variables = load_variables(str(tmp_path / directory), model='vit_micro_patch4_32')
        backbone = variables['params'].get('backbone', variables['params'])
        with torch.no_grad():
            expected = reference(images).numpy()
        assert_close(model.apply({'params': backbone}, jnp.asarray(images.numpy().transpose(0, 2, 3, 1))), expected)
    assert set(variables['params']) == {'backbone', 'head'}
    assert 'weight_g' not in variables['params']['head']['last_layer']


@needs_torch
def test_a_truncated_or_foreign_file_is_named_in_one_line(tmp_path):
    variables = jax.jit(create('deit_micro_patch4_32').init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    torch.save({'model': {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in torch_layout(variables).items()}},
               tmp_path / 'whole.pth')
    data = (tmp_path / 'whole.pth').read_bytes()
    (tmp_path / 'truncated.pth').write_bytes(data[:len(data) // 2])
    (tmp_path / 'notes.pth').write_bytes(b'these are my notes, not a checkpoint\n' * 20)
    for name in ('truncated.pth', 'notes.pth'):
        with pytest.raises(ValueError, match=rf'{name} \([\d,]+ bytes\) is not a readable PyTorch checkpoint: it is '
                                             'truncated, or was not written by torch.save'):
            from_torch(str(tmp_path / name), 'deit_micro_patch4_32')
    result = subprocess.run([sys.executable, '-m', 'vitdistill.convert', f'--checkpoint={tmp_path / "truncated.pth"}',
                             '--model=deit_micro_patch4_32', f'--output={tmp_path / "out"}'], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith('error: ') and 'not a readable PyTorch' in result.stderr
    assert not (tmp_path / 'out').exists()


@needs_torch
def test_a_checkpoint_of_another_model_names_the_models_it_fits():
    distilled = jax.jit(create('deit_micro_distilled_patch4_32').init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match=r'(?s)does not fit deit_micro_patch4_32.*The checkpoint fits '
                                         r'deit_micro_distilled_patch4_32: convert it with '
                                         r'--model=deit_micro_distilled_patch4_32'):
        from_torch(torch_layout(distilled), 'deit_micro_patch4_32')
    # A DINO backbone (no classifier, no distillation token) converted as a distilled DeiT: the plain ViTs fit.
    torch.manual_seed(0)
    backbone = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=4, embed_dim=128, depth=4,
                                                                num_heads=4, num_classes=0)
    with pytest.raises(ValueError, match=r'(?s)missing     dist_token.*The checkpoint fits deit_micro_patch4_32, '
                                         r'vit_micro_patch4_32'):
        from_torch({'teacher': backbone.state_dict()}, 'deit_micro_distilled_patch4_32')
    # ... and as the plain DeiT it converts as a backbone (no classifier to restore: fine-tuning adds one).
    converted = from_torch({'teacher': backbone.state_dict()}, 'deit_micro_patch4_32')
    assert 'head' not in converted['params'] and converted['params']['pos_embed'].shape == (1, 65, 128)
