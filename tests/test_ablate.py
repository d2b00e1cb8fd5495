"""`polynext ablate`: a tiny two-row study end to end, resuming, divergence as a result, the
report's arithmetic on known numbers, the split over torchrun ranks, and bad input."""
from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest

from polynext.ablate import rows as rows_mod
from polynext.ablate import runner, study
from polynext.ablate.report import REPORT_FILES, summarise
from polynext.ablate.rows import PAPER_ROWS, select_rows
from polynext.cli import main
from polynext.train.synthetic import CLASSES, cluttered_digits_arrays, make_cluttered_digit

#: a study small enough for a test: C0 = 8, 32 px, 48 train / 20 val images, one epoch
TINY = ['cluttered_train=48', 'cluttered_val=20', 'img_size=32', 'eval_resize=32', 'batch_size=16',
        'device_batch_size=16']


def _tiny_plan(tmp_path, rows, seeds=1, extra=(), **kw):
    return study.make_plan(rows=rows, seeds=seeds, epochs=1, init_channels=8, output=str(tmp_path / 'study'),
                           set_items=TINY + list(extra), device='cpu', **kw)


# ------------------------------------------------------------------------------------------------
# the generated data
# ------------------------------------------------------------------------------------------------

def test_cluttered_digits_are_a_pure_function_of_seed_split_index():
    a, la = make_cluttered_digit(0, 'train', 7, 32)
    b, lb = make_cluttered_digit(0, 'train', 7, 32)
    c, _ = make_cluttered_digit(0, 'val', 7, 32)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and la == lb == 7
    assert not np.array_equal(a, c)
    images, labels = cluttered_digits_arrays('val', 20, 32)
    assert labels == [i % 10 for i in range(20)] and len(CLASSES) == 10
    assert np.array_equal(images[7], c)


# ------------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------------

def test_two_rows_one_epoch_writes_table_plot_and_files_then_resumes(tmp_path, capsys, monkeypatch):
    plan = _tiny_plan(tmp_path, ['hadamard_to_add'])
    assert [r.name for r in plan.rows] == ['baseline', 'hadamard_to_add']   # the baseline is added
    report = study.run_ablation(plan, jobs=2)
    out = capsys.readouterr().out
    assert '[1/2]' in out and '[2/2]' in out and '2 to train here: 2 at a time' in out
    folder = tmp_path / 'study'
    for name in REPORT_FILES.values():
        assert (folder / name).is_file() and (folder / name).stat().st_size > 0, name
    assert (folder / 'ablation_deltas.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    table = (folder / 'ablation.md').read_text()
    assert '| Hadamard → addition | `hadamard_to_add` |' in table and '-22.3' in table
    assert ' CPU-s, ' in table.splitlines()[2] \
        and f'{max(1, runner.usable_cores() // 2)} thread(s) each' in table.splitlines()[2]
    by_row = {e['row']: e for e in report['rows']}
    base, add = by_row['baseline'], by_row['hadamard_to_add']
    cells = {(c['row'], c['seed']): c for c in report['cells']}
    assert base['top1'] == [cells[('baseline', 0)]['final_top1']]
    assert add['delta'] == [pytest.approx(add['top1'][0] - base['top1'][0])]
    assert all(len(c['history']) == 1 and c['status'] == 'finished' and c['device'] for c in cells.values())
    with open(folder / 'ablation.csv') as f:
        assert [r['row'] for r in csv.DictReader(f)] == ['baseline', 'hadamard_to_add']
    saved = json.loads((folder / 'ablation.json').read_text())
    assert saved['rows'][1]['delta_mean'] == pytest.approx(add['delta_mean'])
    # a finished cell keeps its weights and metrics, not its resume files
    cell_dir = runner.plan_cells(plan)[0].folder
    assert (cell_dir / 'last.safetensors').is_file() and not (cell_dir / 'last.state.pt').exists()

    # re-running skips both cells (nothing trains) and rebuilds the same report
    monkeypatch.setattr(runner, '_start_training', lambda *a, **k: pytest.fail('a finished cell was trained again'))
    again = study.run_ablation(_tiny_plan(tmp_path, ['hadamard_to_add']), jobs=1)
    assert '(2 already finished)' in capsys.readouterr().out
    assert [e['top1'] for e in again['rows']] == [e['top1'] for e in report['rows']]

    # a changed setting is a different cell (new key, new folder), never mixed with the old one
    other = _tiny_plan(tmp_path, ['hadamard_to_add'], extra=['lr=1e-3'])
    assert {c.key for c in runner.plan_cells(other)}.isdisjoint({c.key for c in runner.plan_cells(plan)})


def test_cell_keys_follow_the_data_folder(tmp_path, monkeypatch):
    """The trainer may resume a run whose dataset moved, but a study on other data is another study."""
    monkeypatch.chdir(tmp_path)

    def keys(data):
        return [c.key for c in runner.plan_cells(study.make_plan(rows=['free_scalar'], seeds=1, data=data, output='s'))]

    builtin, a, b = keys(None), keys('data_a'), keys('data_b')
    assert len(set(builtin + a + b)) == 6
    assert keys(str(tmp_path / 'data_a')) == a            # the same folder, relative or absolute
    assert all(c.config.dataset == 'folder' for c in runner.plan_cells(study.make_plan(data='data_a', rows=['baseline'])))


def test_only_unfinished_cells_are_trained(tmp_path, monkeypatch):
    plan = _tiny_plan(tmp_path, ['no_cell_norm'], seeds=2)
    cells = runner.plan_cells(plan)
    assert [(c.row, c.seed) for c in cells] == [('baseline', 0), ('no_cell_norm', 0), ('baseline', 1),
                                                ('no_cell_norm', 1)]
    trained = []

    def fake_training(config, recipe):
        trained.append((config.model_kwargs.get('cell_norm', True), config.seed, config.threads))
        return [dict(epoch=1, train_loss=2.0, val_loss=2.0, val_top1=50.0 + config.seed)]

    monkeypatch.setattr(runner, '_start_training', fake_training)
    runner.train_cell(cells[1], plan.recipe)          # one cell already done
    trained.clear()
    report = study.run_ablation(plan, jobs=1)
    assert sorted((norm, seed) for norm, seed, _ in trained) == [(False, 1), (True, 0), (True, 1)]
    assert {threads for _, _, threads in trained} == {runner.usable_cores()}    # one job: every core
    assert report['rows'][1]['delta'] == [0.0, 0.0]


def test_a_diverging_row_is_a_result_with_its_epoch(tmp_path):
    # Hadamard → addition at lr 1e4: the loss becomes non-finite in the first epoch
    plan = _tiny_plan(tmp_path, ['hadamard_to_add'], extra=['lr=1e4', 'min_lr=0', 'clip_grad=null'])
    report = study.run_ablation(plan, jobs=1)
    add = {e['row']: e for e in report['rows']}['hadamard_to_add']
    cell = [c for c in report['cells'] if c['row'] == 'hadamard_to_add'][0]
    assert cell['status'] == 'diverged' and cell['diverged_epoch'] == 1 and 'non-finite' in cell['message']
    assert add['diverged'] == {'0': 1} and add['top1'] == [pytest.approx(10.0)]   # scored at chance
    assert 'diverged in 1/1 seeds (non-finite loss in epoch 1)' in (tmp_path / 'study' / 'ablation.md').read_text()


def test_cells_are_spread_over_torchrun_ranks(tmp_path, monkeypatch):
    plan = _tiny_plan(tmp_path, ['free_scalar'], seeds=2)
    seen = {}

    def fake_training(config, recipe):
        seen.setdefault(os.environ['RANK_UNDER_TEST'], []).append((config.model_kwargs.get('residual_scale'),
                                                                   config.seed))
        assert os.environ['WORLD_SIZE'] == '1' and os.environ['RANK'] == '0'   # each cell is one process
        return [dict(epoch=1, train_loss=1.0, val_loss=1.0, val_top1=60.0)]

    monkeypatch.setattr(runner, '_start_training', fake_training)
    monkeypatch.setenv('WORLD_SIZE', '2')
    for rank in ('1', '0'):      # rank 1 first, so that rank 0 finds every result when it is done
        monkeypatch.setenv('RANK', rank)
        monkeypatch.setenv('RANK_UNDER_TEST', rank)
        out = study.run_ablation(plan, jobs=1)
        assert (out is None) == (rank == '1')
        assert os.environ['WORLD_SIZE'] == '2' and os.environ['RANK'] == rank
    assert seen == {'0': [(None, 0), (None, 1)], '1': [('free', 0), ('free', 1)]}
    assert out['rows'][1]['delta'] == [0.0, 0.0]


# ------------------------------------------------------------------------------------------------
# the report's arithmetic
# ------------------------------------------------------------------------------------------------

def _res(row, seed, top1, status='finished', epoch=None):
    return dict(row=row, seed=seed, status=status, final_top1=None if status == 'diverged' else top1,
                diverged_epoch=epoch, history=[dict(epoch=1, train_loss=1.0, val_top1=top1)], cpu_s=1.0)


def test_summary_means_paired_deltas_signs_and_order():
    rows = select_rows(['hadamard_to_add', 'sepconv_gelu', 'mlp_gelu'])
    seeds = [0, 1, 2]
    base = [70.0, 72.0, 74.0]
    table = {'hadamard_to_add': [50.0, 49.0, 54.0],      # Δ −20, −23, −20: mean −21, std √3
             'sepconv_gelu': [69.0, 70.0, 75.0],         # Δ −1, −2, +1: n.s.
             'mlp_gelu': [71.0, 73.0, 75.0]}             # Δ +1, +1, +1: opposite sign, significant
    results = {('baseline', s): _res('baseline', s, base[s]) for s in seeds}
    results.update({(r, s): _res(r, s, v[s]) for r, v in table.items() for s in seeds})
    rep = summarise(rows, results, seeds, 10, {'conv': 'cpolynext_t'})
    e = {x['row']: x for x in rep['rows']}
    assert e['baseline']['top1_mean'] == pytest.approx(72.0) and e['baseline']['top1_std'] == pytest.approx(2.0)
    h = e['hadamard_to_add']
    assert h['delta'] == [-20.0, -23.0, -20.0]
    assert h['delta_mean'] == pytest.approx(-21.0) and h['delta_std'] == pytest.approx(math.sqrt(3))
    assert h['sign_agrees'] is True and h['significant'] is True
    s = e['sepconv_gelu']
    assert s['delta_mean'] == pytest.approx(-2 / 3) and s['sign_agrees'] is True and s['significant'] is False
    m = e['mlp_gelu']
    assert m['sign_agrees'] is False and m['significant'] is True
    # paper order: add (−22.3) < sepconv (−0.9) < mlp (−0.25); measured: add < sepconv < mlp → all concordant
    assert [e[r]['order_agree'] for r in ('hadamard_to_add', 'sepconv_gelu', 'mlp_gelu')] == [2, 2, 2]
    assert rep['kendall_tau']['activation'] == pytest.approx(1.0)
    assert rep['kendall_tau']['stabilisation'] is None


def test_diverged_seeds_score_chance_and_collapsed_seeds_are_marked():
    rows = select_rows(['layerscale_1'])
    results = {('baseline', 0): _res('baseline', 0, 60.0), ('baseline', 1): _res('baseline', 1, 62.0),
               ('layerscale_1', 0): _res('layerscale_1', 0, None, 'diverged', epoch=2),
               ('layerscale_1', 1): _res('layerscale_1', 1, 14.0)}
    rep = summarise(rows, results, [0, 1], 10, {'conv': 'cpolynext_t'})
    ls = rep['rows'][1]
    assert ls['top1'] == [10.0, 14.0] and ls['delta'] == [-50.0, -48.0]
    assert ls['diverged'] == {'0': 2} and ls['collapsed'] == [1]


# ------------------------------------------------------------------------------------------------
# bad input: one line, nothing written
# ------------------------------------------------------------------------------------------------

def test_bad_input_is_one_line_before_anything_is_written(tmp_path, capsys):
    out = str(tmp_path / 'never')
    cases = [
        (['--rows', 'hadamard_to_ad'], "unknown ablation row 'hadamard_to_ad'. Did you mean 'hadamard_to_add'"),
        (['--seeds', '0'], '--seeds must be at least 1'),
        (['--model', 'cpolynext_lr'], "'cpolynext_lr' has no APolyNeXt twin for the attention rows"),
        (['--model', 'cpolynext_q'], "unknown model 'cpolynext_q'"),
        (['--init-channels', '6', '--rows', 'wide_2_stacks'], "row 'baseline' cannot be built"),
        (['--data', str(tmp_path / 'nope')], 'data folder not found'),
    ]
    for argv, message in cases:
        assert main(['ablate', '--output', out, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv, err)
    assert not (tmp_path / 'never').exists()


def test_list_rows_names_every_switch():
    assert main(['ablate', '--list-rows']) == 0
    from polynext import ABLATIONS
    assert {r.name for r in PAPER_ROWS} == set(ABLATIONS) | {'baseline', 'baseline_attn'}
    assert rows_mod.get_row('mlp_gelu').paper_text == '-0.1 to -0.4'
