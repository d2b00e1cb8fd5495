"""Robustness evaluation: class maps, ImageNet-C arithmetic, the four folder layouts with a model
whose predictions are written into the images, logit restriction, partial sets, resume, several
models, the CLI and its files."""
import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from PIL import Image

from polynext.cli import main as cli_main
from polynext.errors import ConfigError, DataError
from polynext.robustness import (
    CORRUPTIONS, SEVERITIES, ModelEntry, ProtocolHead, RobustnessData, alexnet_reference, format_report,
    imagenet_1k_wnids, run_robustness, score_imagenet_c, subset_map, write_report,
)
from polynext.robustness.datasets import scan_imagenet_c

ROOT = Path(__file__).resolve().parents[1]
MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
WNIDS = imagenet_1k_wnids()
DECOY = 0          # n01440764 (tench): in neither the ImageNet-A nor the ImageNet-R subset


# ---------------------------------------------------------------------------------------
# A classifier whose prediction is written into the image: class p in three base-16 digits,
# one per colour channel (value 16·d + 8), decoded from the mean colour of the input.
# ---------------------------------------------------------------------------------------

def colour(p: int):
    return tuple(16 * d + 8 for d in (p // 256, (p // 16) % 16, p % 16))


class ColourCodeClassifier(nn.Module):
    """Logit ``level`` for the class coded in the image, ``2·level`` for ``decoy`` (if set)."""

    def __init__(self, decoy=None, fail_after=None, level=10.0, num_classes=1000, **_):
        super().__init__()
        self.level = nn.Parameter(torch.tensor(float(level)))
        self.num_classes = num_classes
        self.decoy = decoy
        self.fail_after = fail_after
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError('simulated interruption')
        rgb = ((x * STD + MEAN) * 255).mean(dim=(2, 3))
        digits = ((rgb - 8) / 16).round().clamp(0, 15).long()
        pred = digits[:, 0] * 256 + digits[:, 1] * 16 + digits[:, 2]
        logits = torch.zeros(x.shape[0], self.num_classes)
        logits[torch.arange(x.shape[0]), pred] = self.level
        if self.decoy is not None:
            logits[:, self.decoy] = 2 * self.level
        return logits


def write_class(folder: Path, wnid: str, predictions, size=8):
    d = folder / wnid
    d.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(predictions):
        Image.new('RGB', (size, size), colour(p)).save(d / f'img{i}.png')


def imagenet_c_correct(ci: int, severity: int) -> int:
    """Images (of 4) predicted right in cell (corruption ci, severity): 4, 3, 2, 1, 0 shifted by ci % 5."""
    return max(0, 4 - ci % 5 - (severity - 1))


#: mean top-1 over the 5 severities of corruption i, from imagenet_c_correct: 25 · mean(correct)
MEAN_TOP1 = {0: 50.0, 1: 30.0, 2: 15.0, 3: 5.0, 4: 0.0}


def make_imagenet_c(root: Path, skip=()):
    """15 × 5 cells of 4 images over IN-1k classes 2 and 3 (targets 2, 3, 2, 3)."""
    for ci, c in enumerate(CORRUPTIONS):
        if c in skip:
            continue
        for s in SEVERITIES:
            if f'{c}/{s}' in skip:
                continue
            k = imagenet_c_correct(ci, s)
            cell = root / c / str(s)
            targets = [2, 3, 2, 3]
            preds = [t if j < k else 999 for j, t in enumerate(targets)]
            write_class(cell, WNIDS[2], [p for p, t in zip(preds, targets) if t == 2])
            write_class(cell, WNIDS[3], [p for p, t in zip(preds, targets) if t == 3])
    return root


def make_subset(root: Path, key: str):
    """Two classes at subset positions 5 and 100 (folders 0 and 1): 3 images, 2 right → 66.67 %."""
    sub = subset_map(key)
    a, b = sub.in1k_indices[5], sub.in1k_indices[100]
    write_class(root, sub.wnids[5], [a, b])        # right, wrong (another class of the subset)
    write_class(root, sub.wnids[100], [b])         # right
    return root


def make_folder_1k(root: Path, classes, correct):
    """Two images per IN-1k class; the first ``correct[i]`` of class i are predicted right."""
    for idx, k in zip(classes, correct):
        write_class(root, WNIDS[idx], [idx if j < k else (idx + 1) % 1000 for j in range(2)])
    return root


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp('robust_data')
    return dict(
        imagenet_c=make_imagenet_c(base / 'imagenet-c'),
        imagenet_a=make_subset(base / 'imagenet-a', 'imagenet_a'),
        imagenet_r=make_subset(base / 'imagenet-r', 'imagenet_r'),
        sketch=make_folder_1k(base / 'sketch', [3, 500], [2, 0]),      # 2 of 4 right → 50 %
        val=make_folder_1k(base / 'val', [10, 20], [2, 1]),            # 3 of 4 right → 75 %
    )


def entry(label='probe', **kw):
    return ModelEntry.from_model(label, ColourCodeClassifier(**kw), source='test')


def run(entries, data, out, **kw):
    kw.setdefault('batch_size', 8)
    kw.setdefault('workers', 0)
    kw.setdefault('show_progress', False)
    lines = []
    report = run_robustness(entries, RobustnessData(**data), out, log=lines.append, **kw)
    return report, lines


def expected_mce(mean_top1_by_corruption):
    ref = alexnet_reference().mce_errors
    ces = [100 * (100 - t) / ref[c] for c, t in mean_top1_by_corruption.items()]
    return sum(ces) / len(ces)


# ---------------------------------------------------------------------------------------
# Class maps (package data)
# ---------------------------------------------------------------------------------------

def test_class_maps_have_the_known_structure_and_equal_timms_copy():
    assert len(WNIDS) == 1000 and list(WNIDS) == sorted(WNIDS) and len(set(WNIDS)) == 1000
    assert WNIDS[0] == 'n01440764' and WNIDS[999] == 'n15075141'
    info = Path(__import__('timm').__file__).parent / 'data' / '_info'
    read = lambda name: (info / name).read_text().split()  # noqa: E731
    assert list(WNIDS) == read('imagenet_synsets.txt')
    for key, prefix in (('imagenet_a', 'imagenet_a'), ('imagenet_r', 'imagenet_r')):
        sub = subset_map(key)
        assert len(sub) == 200 and len(set(sub.wnids)) == 200
        assert list(sub.wnids) == sorted(sub.wnids)
        assert list(sub.in1k_indices) == sorted(sub.in1k_indices)
        assert all(w in WNIDS for w in sub.wnids)
        assert list(sub.in1k_indices) == [WNIDS.index(w) for w in sub.wnids]
        assert list(sub.wnids) == read(f'{prefix}_synsets.txt')
        assert list(sub.in1k_indices) == [int(i) for i in read(f'{prefix}_indices.txt')]
    a, r = subset_map('imagenet_a'), subset_map('imagenet_r')
    assert (a.in1k_indices[:3], r.in1k_indices[:3]) == ((6, 11, 13), (1, 2, 4))
    # the generator script rebuilds exactly the shipped file's data
    spec = importlib.util.spec_from_file_location('make_imagenet_subsets', ROOT / 'tools' / 'make_imagenet_subsets.py')
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    shipped = json.loads((ROOT / 'src' / 'polynext' / 'data' / 'imagenet_subsets.json').read_text())
    rebuilt = tool.build()
    assert all(shipped[k] == rebuilt[k] for k in ('imagenet_1k', 'imagenet_a', 'imagenet_r'))


def test_alexnet_reference_errors():
    ref = alexnet_reference()
    assert list(ref.mce_errors) == list(CORRUPTIONS)
    assert ref.mce_errors['gaussian_noise'] == 88.6 and ref.mce_errors['jpeg_compression'] == 60.7
    assert ref.mce_errors['brightness'] == 56.5 and ref.mce_errors['elastic_transform'] == 64.6
    assert ref.clean_error == 43.478
    # the per-severity errors average to the spec's rounded errors (60.65 rounds half up to 60.7)
    for c in CORRUPTIONS:
        assert len(ref.severity_errors[c]) == 5
        assert abs(sum(ref.severity_errors[c]) / 5 - ref.mce_errors[c]) <= 0.05 + 1e-9, c
    assert ref.severity_errors['gaussian_noise'] == (69.528, 82.542, 93.554, 98.138, 99.452)


# ---------------------------------------------------------------------------------------
# mCE arithmetic
# ---------------------------------------------------------------------------------------

def test_mce_and_relative_mce_by_hand():
    top1 = {'gaussian_noise': {1: 60, 2: 50, 3: 40, 4: 30, 5: 20}, 'brightness': {1: 90, 2: 85, 3: 80, 4: 75, 5: 70}}
    s = score_imagenet_c(top1, clean_top1=80.0)
    # gaussian: mean 40, error 60, CE = 100·60/88.6 = 67.7201; brightness: mean 80, error 20, CE = 100·20/56.5 = 35.3982
    assert s.corruptions['gaussian_noise'].mean_top1 == 40.0
    assert s.corruptions['gaussian_noise'].ce == pytest.approx(67.72009, abs=1e-4)
    assert s.corruptions['brightness'].ce == pytest.approx(35.39823, abs=1e-4)
    assert s.mce == pytest.approx(51.55916, abs=1e-4)
    # relative (clean error 20): gaussian Σ(E_s − 20) = 300 − 100 = 200 over AlexNet's
    # Σ(E_s − 43.478) = 443.214 − 217.39 = 225.824 → 88.5645; brightness Σ = 100 − 100 = 0 → 0
    assert s.corruptions['gaussian_noise'].relative_ce == pytest.approx(88.56455, abs=1e-4)
    assert s.corruptions['brightness'].relative_ce == pytest.approx(0.0, abs=1e-12)
    assert s.relative_mce == pytest.approx(44.28227, abs=1e-4)
    assert not s.complete and len(s.missing) == 13 and 'fog' in s.missing
    # AlexNet's own errors give 100 for both
    ref = alexnet_reference()
    alex = {c: {k + 1: 100 - e for k, e in enumerate(ref.severity_errors[c])} for c in CORRUPTIONS}
    full = score_imagenet_c(alex, clean_top1=100 - ref.clean_error)
    assert full.complete and full.missing == []
    assert full.relative_mce == pytest.approx(100.0, abs=1e-9)
    assert full.mce == pytest.approx(100.0, abs=0.1)     # the mCE normalisers are rounded to 0.1
    assert score_imagenet_c(alex).relative_mce is None


def test_missing_severities_are_averaged_over_what_exists_and_listed():
    s = score_imagenet_c({'fog': {1: 50, 2: 40, 4: 20}})
    assert s.corruptions['fog'].mean_top1 == pytest.approx(110 / 3)
    assert s.corruptions['fog'].missing_severities == [3, 5]
    assert 'fog/3' in s.missing and 'fog/5' in s.missing and 'gaussian_noise' in s.missing
    with pytest.raises(ValueError):
        score_imagenet_c({'speckle_noise': {1: 50}})


# ---------------------------------------------------------------------------------------
# End to end on the four layouts
# ---------------------------------------------------------------------------------------

def test_all_four_datasets_and_clean_give_the_known_numbers(data, tmp_path):
    probe = entry()
    report, lines = run([probe], data, tmp_path / 'out', relative_mce=True)
    m = report.models[0]
    assert m['clean']['top1'] == 75.0 and m['clean']['images'] == 4
    assert m['sketch']['top1'] == 50.0 and m['sketch']['images'] == 4
    assert m['imagenet_a']['top1'] == pytest.approx(66.6667, abs=1e-3) and m['imagenet_a']['images'] == 3
    assert m['imagenet_r']['top1'] == pytest.approx(66.6667, abs=1e-3)
    c = m['imagenet_c']
    assert c['complete'] and c['missing'] == [] and c['corruptions_evaluated'] == 15
    for ci, name in enumerate(CORRUPTIONS):
        for s in SEVERITIES:
            assert c['cells'][f'{name}/{s}']['top1'] == 25.0 * imagenet_c_correct(ci, s)
            assert c['cells'][f'{name}/{s}']['images'] == 4
        assert c['corruptions'][name]['mean_top1'] == MEAN_TOP1[ci % 5]
    # mCE = mean over c of 100·(100 − mean top-1_c)/AlexNet_c with the mean top-1 above
    assert c['mce'] == pytest.approx(expected_mce({n: MEAN_TOP1[i % 5] for i, n in enumerate(CORRUPTIONS)}), abs=1e-3)
    assert c['mce'] == pytest.approx(103.2855, abs=1e-3)
    # relative CE of gaussian_noise (top-1 100, 75, 50, 25, 0 → errors 0..100; clean error 25):
    # Σ(E_s − 25) = 250 − 125 = 125 over AlexNet's 225.824 → 55.353
    assert c['corruptions']['gaussian_noise']['relative_ce'] == pytest.approx(100 * 125 / 225.824, abs=1e-3)
    assert probe.model.calls == 1 + 75 + 1 + 1 + 1     # one batch per cell, every cell once
    assert any('ImageNet-C gaussian_noise/1' in ln for ln in lines)
    text = format_report(report)
    assert 'mCE' in text and 'gaussian_noise' in text and '103.29' in text


def test_subset_logits_are_restricted_before_the_argmax(data, tmp_path):
    decoy = entry('decoy', decoy=DECOY)     # global argmax: class 0, outside both 200-class subsets
    report, _ = run([decoy], {k: data[k] for k in ('imagenet_a', 'imagenet_r', 'sketch')}, tmp_path / 'out')
    m = report.models[0]
    assert m['imagenet_a']['top1'] == pytest.approx(66.6667, abs=1e-3)     # restricted argmax is the coded class
    assert m['imagenet_r']['top1'] == pytest.approx(66.6667, abs=1e-3)
    assert m['sketch']['top1'] == 0.0                                     # 1000 classes: the decoy wins
    # the same images scored over all 1000 classes would be all wrong
    x = torch.zeros(2, 3, 4, 4)
    full = ProtocolHead(decoy.model, decoy.mean, decoy.std)(x)
    assert full.shape == (2, 1000) and int(full.argmax(1)[0]) == DECOY
    # ImageNet-R: the index restriction equals the reference's boolean mask over the sorted wnids
    r = subset_map('imagenet_r')
    mask = torch.tensor([w in set(r.wnids) for w in WNIDS])
    logits = torch.randn(3, 1000)

    class Fixed(nn.Module):
        def forward(self, x):
            return logits
    out = ProtocolHead(Fixed(), (0, 0, 0), (1, 1, 1), r.in1k_indices)(torch.zeros(3, 3, 4, 4))
    assert out.shape == (3, 200) and torch.equal(out, logits[:, mask])


def test_partial_imagenet_c_is_refused_then_reported(tmp_path):
    root = make_imagenet_c(tmp_path / 'c', skip=('fog', 'frost/3'))
    layout = scan_imagenet_c(root)
    assert layout.missing == ['frost/3', 'fog'] and len(layout.cells) == 75 - 5 - 1
    with pytest.raises(DataError) as e:
        run([entry()], dict(imagenet_c=root), tmp_path / 'out')
    msg = str(e.value)
    assert 'incomplete' in msg and 'fog' in msg and 'frost/3' in msg and '--allow-partial' in msg
    assert not (tmp_path / 'out' / 'state.json').exists()
    report, lines = run([entry()], dict(imagenet_c=root), tmp_path / 'out', allow_partial=True)
    c = report.models[0]['imagenet_c']
    assert not c['complete'] and c['missing'] == ['frost/3', 'fog'] and c['corruptions_evaluated'] == 14
    assert 'fog' not in c['corruptions']
    assert c['corruptions']['frost']['top1'] == {'1': 25.0, '2': 0.0, '4': 0.0, '5': 0.0}
    assert c['corruptions']['frost']['mean_top1'] == 6.25 and c['corruptions']['frost']['missing_severities'] == [3]
    means = {n: MEAN_TOP1[i % 5] for i, n in enumerate(CORRUPTIONS) if n != 'fog'}
    means['frost'] = 6.25
    assert c['mce'] == pytest.approx(expected_mce(means), abs=1e-3)
    assert c['mce'] == pytest.approx(101.8336, abs=1e-3)
    assert any('partial' in ln and 'fog' in ln for ln in lines)
    text = format_report(report)
    assert '(partial: 14/15)' in text and 'missing ImageNet-C cells: frost/3, fog' in text
    write_report(report, tmp_path / 'out')
    rows = list(csv.DictReader(open(tmp_path / 'out' / 'imagenet_c.csv')))
    fog = next(r for r in rows if r['corruption'] == 'fog')
    frost = next(r for r in rows if r['corruption'] == 'frost')
    assert len(rows) == 15 and fog['mean_top1'] == '' and fog['ce'] == ''
    assert frost['severity_3'] == '' and float(frost['severity_1']) == 25.0 and float(frost['mean_top1']) == 6.25
    summary = list(csv.DictReader(open(tmp_path / 'out' / 'summary.csv')))
    assert summary[0]['imagenet_c_complete'] == 'False' and summary[0]['imagenet_c_missing'] == 'frost/3;fog'


def test_resume_after_an_interruption_evaluates_only_the_unfinished_cells(tmp_path):
    # 3 corruptions × 5 severities + ImageNet-A = 16 cells of one batch each
    keep = ('gaussian_noise', 'fog', 'pixelate')
    sub = dict(imagenet_c=make_imagenet_c(tmp_path / 'c', skip=[c for c in CORRUPTIONS if c not in keep]),
               imagenet_a=make_subset(tmp_path / 'a', 'imagenet_a'))
    out = tmp_path / 'out'
    first = entry(fail_after=7)
    with pytest.raises(RuntimeError, match='simulated interruption'):
        run([first], sub, out, allow_partial=True)
    state = json.loads((out / 'state.json').read_text())
    assert len(state['cells']) == 7 and state['format'] == 'polynext.robustness.state/1'
    again = entry()
    report, lines = run([again], sub, out, allow_partial=True)
    assert again.model.calls == 16 - 7
    assert any('resuming' in ln and '7 of 16' in ln for ln in lines)
    fresh, _ = run([entry()], sub, tmp_path / 'fresh', allow_partial=True)
    drop_time = lambda cells: {k: {f: v for f, v in c.items() if f != 'seconds'} for k, c in cells.items()}  # noqa
    resumed_c, fresh_c = report.models[0]['imagenet_c'], fresh.models[0]['imagenet_c']
    assert drop_time(resumed_c.pop('cells')) == drop_time(fresh_c.pop('cells'))
    assert resumed_c == fresh_c and resumed_c['mce'] == pytest.approx(
        expected_mce({'gaussian_noise': 50.0, 'fog': 0.0, 'pixelate': 5.0}), abs=1e-3)
    assert report.models[0]['imagenet_a']['top1'] == fresh.models[0]['imagenet_a']['top1']
    # a third run has nothing to do; other weights are not served from the cache
    done = entry()
    run([done], sub, out, allow_partial=True)
    assert done.model.calls == 0
    other = entry(level=7.0)
    run([other], sub, out, allow_partial=True)
    assert other.model.calls == 16


def test_several_models_side_by_side_share_each_batch(data, tmp_path):
    a, b = entry('probe'), entry('decoy', decoy=DECOY)
    report, _ = run([a, b], data, tmp_path / 'out')
    assert a.model.calls == b.model.calls == 79           # every cell, each model once per batch
    pa, pb = report.models
    assert (pa['model'], pb['model']) == ('probe', 'decoy')
    assert pb['clean']['top1'] == 0.0 and pb['sketch']['top1'] == 0.0
    assert pb['imagenet_a']['top1'] == pytest.approx(66.6667, abs=1e-3)
    assert pb['imagenet_c']['mce'] == pytest.approx(129.3350, abs=1e-3)     # 100 · mean_c 100 / AlexNet_c
    assert pa['imagenet_c']['mce'] == pytest.approx(103.2855, abs=1e-3)
    text = format_report(report)
    assert 'side by side' in text and '129.34' in text and '103.29' in text
    files = write_report(report, tmp_path / 'out')
    assert sorted(f.name for f in files) == ['imagenet_c.csv', 'robustness.json', 'summary.csv']
    summary = list(csv.DictReader(open(tmp_path / 'out' / 'summary.csv')))
    assert [r['model'] for r in summary] == ['probe', 'decoy']
    assert float(summary[0]['clean_top1']) == 75.0 and float(summary[1]['mce']) == pytest.approx(129.335, abs=1e-3)
    assert float(summary[0]['imagenet_a_top1']) == pytest.approx(66.6667, abs=1e-3)
    assert 'relative_mce' not in summary[0]
    rows = list(csv.DictReader(open(tmp_path / 'out' / 'imagenet_c.csv')))
    assert len(rows) == 30
    g = next(r for r in rows if r['model'] == 'probe' and r['corruption'] == 'gaussian_noise')
    assert [float(g[f'severity_{s}']) for s in SEVERITIES] == [100.0, 75.0, 50.0, 25.0, 0.0]
    assert float(g['ce']) == pytest.approx(100 * 50 / 88.6, abs=1e-3) and float(g['alexnet_error']) == 88.6
    js = json.loads((tmp_path / 'out' / 'robustness.json').read_text())
    assert js['format'] == 'polynext.robustness/1' and len(js['models']) == 2
    assert js['datasets']['imagenet_c']['complete'] is True
    assert js['models'][0]['imagenet_c']['cells']['fog/1']['images'] == 4
    assert js['alexnet']['mce_errors']['fog'] == 81.9


def test_bad_folders_give_one_clear_message(tmp_path):
    probe = [entry()]
    with pytest.raises(DataError, match='folder not found'):
        run(probe, dict(imagenet_a=tmp_path / 'nope'), tmp_path / 'o')
    # a 1000-class wnid that is not one of the 200 ImageNet-A classes
    write_class(tmp_path / 'a', WNIDS[0], [0])
    with pytest.raises(DataError, match="'n01440764' is not one of the 200 ImageNet-A classes"):
        run(probe, dict(imagenet_a=tmp_path / 'a'), tmp_path / 'o')
    # not wnid folders at all
    write_class(tmp_path / 's' / 'x', 'cat', [0])
    write_class(tmp_path / 's' / 'y', 'dog', [0])
    with pytest.raises(DataError, match='holds no <wnid> class folders'):
        run(probe, dict(sketch=tmp_path / 's'), tmp_path / 'o')
    # the released archive's inner folder is found (ImageNet-Sketch: DIR/sketch/<wnid>)
    write_class(tmp_path / 'sk' / 'sketch', WNIDS[7], [7, 7])
    report, _ = run(probe, dict(sketch=tmp_path / 'sk'), tmp_path / 'o')
    assert report.models[0]['sketch']['top1'] == 100.0
    assert any('1 of the 1000 class folders' in n for n in report.notes)
    with pytest.raises(DataError, match='none of the 15 corruption folders'):
        run(probe, dict(imagenet_c=tmp_path / 'a'), tmp_path / 'o')
    with pytest.raises(ConfigError, match='--val'):
        run(probe, dict(imagenet_c=tmp_path / 'a'), tmp_path / 'o', relative_mce=True)


def test_imagenet_c_in_category_folders_and_extra_corruptions(tmp_path):
    flat = make_imagenet_c(tmp_path / 'flat')
    grouped = tmp_path / 'grouped'
    from polynext.robustness.protocols import CORRUPTION_CATEGORIES
    for category, names in CORRUPTION_CATEGORIES.items():
        (grouped / category).mkdir(parents=True)
        for n in names:
            (flat / n).rename(grouped / category / n)
    write_class(grouped / 'speckle_noise' / '1', WNIDS[0], [0])
    layout = scan_imagenet_c(grouped)
    assert layout.complete and len(layout.cells) == 75 and layout.ignored == ['speckle_noise']
    assert layout.cells[('fog', 2)] == grouped / 'weather' / 'fog' / '2'


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def probe_name():
    from timm.models import register_model

    def robustness_probe(pretrained=False, **kwargs):
        return ColourCodeClassifier(**kwargs)
    register_model(robustness_probe)
    return 'robustness_probe'


def test_cli_timm_model_from_a_checkpoint_and_refusals(data, tmp_path, capsys, probe_name):
    ckpt = tmp_path / 'probe.pth'
    torch.save({'state_dict': ColourCodeClassifier().state_dict()}, ckpt)
    out = tmp_path / 'out'
    args = ['robustness', '--model', probe_name, '--checkpoint', str(ckpt), '--imagenet-a', str(data['imagenet_a']),
            '--sketch', str(data['sketch']), '--output', str(out), '--workers', '0', '--batch-size', '2',
            '--no-progress', '--device', 'cpu']
    assert cli_main(args) == 0
    text = capsys.readouterr().out
    assert 'ImageNet-A top-1 (%)' in text and '66.67' in text and 'ImageNet-Sketch top-1 (%)' in text
    js = json.loads((out / 'robustness.json').read_text())
    assert js['models'][0]['weights'] == str(ckpt) and js['models'][0]['sketch']['top1'] == 50.0
    assert cli_main(args) == 0                                           # everything cached
    assert 'resuming' in capsys.readouterr().out
    # no weights: refused; with --allow-random-weights it runs
    no_w = [a for a in args if a not in ('--checkpoint', str(ckpt))]
    assert cli_main(no_w) == 2
    err = capsys.readouterr().err
    assert "no weights for 'robustness_probe'" in err and '--allow-random-weights' in err and len(err.splitlines()) == 1
    assert cli_main(no_w + ['--allow-random-weights', '--output', str(tmp_path / 'rnd')]) == 0
    capsys.readouterr()
    # counts that do not match, nothing to evaluate, a missing folder
    assert cli_main(['robustness', '--model', probe_name, probe_name, '--checkpoint', str(ckpt),
                     '--imagenet-a', str(data['imagenet_a'])]) == 2
    assert 'one --checkpoint per --model' in capsys.readouterr().err
    assert cli_main(['robustness', '--model', probe_name, '--checkpoint', str(ckpt)]) == 2
    assert 'nothing to evaluate' in capsys.readouterr().err
    assert cli_main(['robustness', '--model', probe_name, '--checkpoint', str(ckpt), '--imagenet-r',
                     str(tmp_path / 'missing')]) == 2
    assert 'folder not found' in capsys.readouterr().err


def test_cli_polynext_checkpoint_and_a_non_imagenet_head(data, tmp_path, capsys):
    from polynext import create_model
    from polynext.checkpoint import save_safetensors
    m = create_model('cpolynext_t', init_channels=8)
    good = save_safetensors(m.state_dict(), tmp_path / 'tiny.safetensors',
                            metadata=dict(architecture='cpolynext_t', model_kwargs=dict(init_channels=8)))
    ten = create_model('cpolynext_t', init_channels=8, num_classes=10)
    bad = save_safetensors(ten.state_dict(), tmp_path / 'ten.safetensors',
                           metadata=dict(architecture='cpolynext_t', model_kwargs=dict(init_channels=8)))
    common = ['--imagenet-r', str(data['imagenet_r']), '--workers', '0', '--no-progress', '--device', 'cpu']
    assert cli_main(['robustness', '--model', 'cpolynext_t', '--checkpoint', str(bad), *common,
                     '--output', str(tmp_path / 'o1')]) == 2
    err = capsys.readouterr().err
    assert 'has 10 classes' in err and '1000 classes' in err
    assert cli_main(['robustness', '--model', 'cpolynext_t', '--checkpoint', str(good), *common,
                     '--output', str(tmp_path / 'o3')]) == 0
    js = json.loads((tmp_path / 'o3' / 'robustness.json').read_text())
    r = js['models'][0]['imagenet_r']
    assert r['images'] == 3 and r['classes'] == 2 and r['expected_classes'] == 200
    assert js['models'][0]['architecture'] == 'cpolynext_t'


def test_cli_lists_the_command(capsys):
    assert cli_main([]) == 0
    assert 'robustness' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(['robustness', '--help'])
    assert '--imagenet-c' in capsys.readouterr().out


def test_two_processes_under_torchrun_count_every_image_once(data, tmp_path):
    """Shards of 2 CPU ranks (gloo), sums reduced: the numbers of the single-process run."""
    launcher = tmp_path / 'launch.py'
    launcher.write_text(
        'import sys\n'
        f'sys.path[:0] = [{str(ROOT / "src")!r}, {str(Path(__file__).parent)!r}]\n'
        'from timm.models import register_model\n'
        'from test_robustness import ColourCodeClassifier\n'
        'def robustness_probe(pretrained=False, **kw):\n'
        '    return ColourCodeClassifier(**kw)\n'
        'register_model(robustness_probe)\n'
        'from polynext.cli import main\n'
        'sys.exit(main(sys.argv[1:]))\n')
    torch.save(ColourCodeClassifier().state_dict(), tmp_path / 'probe.pth')
    out = tmp_path / 'out'
    args = ['robustness', '--model', 'robustness_probe', '--checkpoint', str(tmp_path / 'probe.pth'),
            '--val', str(data['val']), '--imagenet-c', str(data['imagenet_c']), '--imagenet-a', str(data['imagenet_a']),
            '--sketch', str(data['sketch']), '--output', str(out), '--workers', '0', '--batch-size', '2',
            '--no-progress', '--device', 'cpu']
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
    env['OMP_NUM_THREADS'] = '1'
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(launcher)]
    proc = subprocess.run(torchrun + args, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('ImageNet-A top-1 (%)') == 1          # rank 0 prints
    m = json.loads((out / 'robustness.json').read_text())['models'][0]
    assert m['clean']['top1'] == 75.0 and m['clean']['images'] == 4
    assert m['sketch']['top1'] == 50.0 and m['imagenet_a']['images'] == 3
    assert m['imagenet_a']['top1'] == pytest.approx(66.6667, abs=1e-3)
    assert m['imagenet_c']['cells']['gaussian_noise/2']['images'] == 4
    assert m['imagenet_c']['mce'] == pytest.approx(103.2855, abs=1e-3)
