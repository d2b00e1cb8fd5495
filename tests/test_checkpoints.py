"""Loading the authors' checkpoints: wrappers, strictness, clear errors, timm path, convert."""
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file

import polynext
from polynext import CheckpointError, load_reference_state_dict
from polynext.checkpoint import atomic_save, read_checkpoint, unwrap_state_dict
from polynext.cli import main as cli_main

from conftest import GOLDEN

REF_SD = load_file(str(GOLDEN / 'APolyNeXt_T' / 'state_dict.safetensors'))
X = load_file(str(GOLDEN / 'APolyNeXt_T' / 'input.safetensors'))['x']
Y = load_file(str(GOLDEN / 'APolyNeXt_T' / 'output.safetensors'))['logits']
MINI = dict(init_channels=16, num_classes=10)


def _logits(model):
    with torch.no_grad():
        return model.eval()(X)


@pytest.mark.parametrize('wrap', [
    lambda sd: sd,
    lambda sd: {'state_dict': sd, 'epoch': 3},
    lambda sd: {'model': sd},
    lambda sd: {f'module.{k}': v for k, v in sd.items()},
    lambda sd: {'model': {k: torch.zeros_like(v) for k, v in sd.items()},
                'state_dict_ema': {f'module.{k}': v for k, v in sd.items()} | {'n_averaged': torch.tensor(5)}},
    lambda sd: {'state_dict': {k: torch.zeros_like(v) for k, v in sd.items()}, 'ema': sd},
], ids=['plain', 'state_dict', 'model', 'module-prefix', 'ema-wins', 'ema-key'])
def test_reference_wrappers(wrap):
    model = timm.create_model('apolynext_t', **MINI)
    load_reference_state_dict(model, wrap(dict(REF_SD)))
    torch.testing.assert_close(_logits(model), Y, atol=2e-5, rtol=1e-4)


def test_missing_key_is_named():
    sd = dict(REF_SD)
    del sd['cells.7.ops.3.1.k_conv.weight']
    model = timm.create_model('apolynext_t', **MINI)
    with pytest.raises(CheckpointError, match=r"'cells\.7\.ops\.3\.1\.k_conv\.weight' is missing"):
        load_reference_state_dict(model, sd)


def test_wrong_model_names_first_bad_key_and_guesses_the_right_one():
    model = timm.create_model('cpolynext_t', **MINI)  # checkpoint is APolyNeXt
    with pytest.raises(CheckpointError) as e:
        load_reference_state_dict(model, REF_SD)
    msg = str(e.value)
    assert 'cells.4' in msg and 'looks like apolynext_t (init_channels=16, num_classes=10)' in msg


def test_wrong_width_reports_shapes():
    model = timm.create_model('apolynext_t', init_channels=24, num_classes=10)
    with pytest.raises(CheckpointError, match=r"'stem\.weight' has shape \[16, 3, 7, 7\] but the model expects \[24, 3, 7, 7\]"):
        load_reference_state_dict(model, REF_SD)


def test_unexpected_key_is_an_error():
    sd = dict(REF_SD)
    sd['cells.0.extra'] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unexpected key 'cells.0.extra'"):
        load_reference_state_dict(timm.create_model('apolynext_t', **MINI), sd)


def test_truncated_and_empty_files(tmp_path):
    path = tmp_path / 'apolynext_t.pt'
    torch.save(REF_SD, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match='truncated'):
        read_checkpoint(path)
    (tmp_path / 'empty.pt').write_bytes(b'')
    with pytest.raises(CheckpointError, match='empty'):
        read_checkpoint(tmp_path / 'empty.pt')
    with pytest.raises(CheckpointError, match='not found'):
        read_checkpoint(tmp_path / 'nope.pt')
    (tmp_path / 'bad.safetensors').write_bytes(b'\x00' * 20)
    with pytest.raises(CheckpointError, match='safetensors'):
        read_checkpoint(tmp_path / 'bad.safetensors')


def test_timm_pretrained_file_path(tmp_path):
    path = tmp_path / 'apolynext_t.pt'
    torch.save({'state_dict': REF_SD}, path)
    # (the mini checkpoint has 10 classes; the released ones have the cfg's 1000)
    model = timm.create_model('apolynext_t', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10), **MINI)
    torch.testing.assert_close(_logits(model), Y, atol=2e-5, rtol=1e-4)
    # another class count: timm drops the classifier and loads the rest
    other = timm.create_model('apolynext_t', pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
                              init_channels=16, num_classes=3)
    torch.testing.assert_close(other.stem.weight, REF_SD['stem.weight'])


def test_convert_command_and_reload(tmp_path, capsys):
    src = tmp_path / 'apolynext_t.pt'
    torch.save({'model': REF_SD}, src)
    out = tmp_path / 'apolynext_t.safetensors'
    assert cli_main(['convert', str(src), str(out)]) == 0  # model inferred from the checkpoint
    assert 'inferred model: apolynext_t' in capsys.readouterr().out
    model = polynext.create_model('apolynext_t', checkpoint=out, init_channels=16)
    assert model.num_classes == 10
    torch.testing.assert_close(_logits(model), Y, atol=2e-5, rtol=1e-4)
    via_timm = timm.create_model('apolynext_t', pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(out), num_classes=10), **MINI)
    torch.testing.assert_close(_logits(via_timm), Y, atol=2e-5, rtol=1e-4)
    # a mismatching --model is refused with one line on stderr
    assert cli_main(['convert', str(src), str(tmp_path / 'x.safetensors'), '--model', 'cpolynext_t']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'does not match cpolynext_t' in err


def test_console_script_entry_point(tmp_path):
    res = subprocess.run([sys.executable, '-m', 'polynext', 'convert', str(tmp_path / 'missing.pt'),
                          str(tmp_path / 'o.safetensors'), '--model', 'cpolynext_t'], capture_output=True, text=True)
    assert res.returncode == 2 and 'checkpoint not found' in res.stderr and 'Traceback' not in res.stderr


def test_unknown_model_name_suggests():
    with pytest.raises(polynext.ConfigError, match="unknown model 'cpolynxt_s'.*'cpolynext_s'"):
        polynext.create_model('cpolynxt_s')


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / 'ckpt.pt'
    atomic_save({'a': torch.ones(2)}, path)

    def boom(obj, f):
        open(f, 'wb').write(b'partial')
        raise RuntimeError('killed')
    monkeypatch.setattr(torch, 'save', boom)
    with pytest.raises(RuntimeError):
        atomic_save({'a': torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path)['a'], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt.pt']


def test_unwrap_rejects_non_checkpoints():
    with pytest.raises(CheckpointError, match='no model weights'):
        unwrap_state_dict({'epoch': 3, 'args': {}})
