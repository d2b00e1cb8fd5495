"""The ablation report: the paper's table with error bars, the Δ bar plot, learning curves, JSON, CSV.

Per row and seed the score is the val top-1 after the last epoch. A seed whose loss became
non-finite scores chance (100 / classes): the run did not complete its recipe; its last finite
top-1 stays in the JSON. A finished seed at most 1.5 × chance is "collapsed" (it trained, but
learned next to nothing).

Per row: mean ± sample std of the score over the seeds; Δ = the mean ± std over seeds of
(row − the baseline of its model family, same seed): paired, so the seed-to-seed spread common
to both cancels. "sign": ✓ when the measured Δ has the paper's sign, ✗ when not, "(n.s.)" when
|mean Δ| < 2 standard errors (std / √seeds), i.e. the seeds do not settle the sign. "order": of
the pairs this row forms with the other rows of its table whose paper Δs differ, how many are
ordered as in the paper (which of the two hurts more); Kendall's τ over the whole table is given
under it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..checkpoint import atomic_write
from ..engine.metrics import csv_text
from .rows import BASELINES, PAPER_BASELINE_TOP1, TABLES, PaperRow

__all__ = ['summarise', 'format_table', 'write_report', 'REPORT_FILES', 'COLLAPSE_FACTOR']

REPORT_FORMAT = 'polynext.ablate.report/1'
#: a finished seed at most this many times chance is reported as collapsed
COLLAPSE_FACTOR = 1.5
REPORT_FILES = dict(table='ablation.md', json='ablation.json', csv='ablation.csv', cells_csv='ablation_cells.csv',
                    deltas='ablation_deltas.png', curves='ablation_curves.png')


def _mean_std(xs: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _score(res: Mapping[str, Any], chance: float) -> float:
    return chance if res['status'] == 'diverged' else float(res['final_top1'])


def summarise(rows: Sequence[PaperRow], results: Mapping[Tuple[str, int], Mapping[str, Any]], seeds: Sequence[int],
              num_classes: int, models: Mapping[str, str], params: Optional[Mapping[str, int]] = None,
              settings: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The report as a plain dict: one entry per row (scores, Δ, agreement), per-table Kendall τ,
    and every cell's result. ``results`` maps (row, seed) → cell result."""
    chance = 100.0 / num_classes
    out_rows: List[Dict[str, Any]] = []
    base_scores: Dict[str, Dict[int, float]] = {}
    for fam, base in BASELINES.items():
        base_scores[fam] = {s: _score(results[(base, s)], chance) for s in seeds if (base, s) in results}
    for row in rows:
        cells = {s: results[(row.name, s)] for s in seeds if (row.name, s) in results}
        scores = {s: _score(r, chance) for s, r in cells.items()}
        mean, std = _mean_std(list(scores.values()))
        entry: Dict[str, Any] = dict(
            row=row.name, table=row.table, family=row.family, model=models.get(row.family), label=row.label,
            baseline=row.is_baseline, seeds=sorted(scores), top1=[scores[s] for s in sorted(scores)],
            top1_mean=mean, top1_std=std, params=(params or {}).get(row.name),
            paper_delta=list(row.paper_delta) if row.paper_delta else None, paper_delta_mid=row.paper_mid,
            paper_top1=PAPER_BASELINE_TOP1[row.family] if row.is_baseline else None)
        diverged = {s: r['diverged_epoch'] for s, r in cells.items() if r['status'] == 'diverged'}
        collapsed = [s for s, r in cells.items() if r['status'] == 'finished' and scores[s] <= COLLAPSE_FACTOR * chance]
        entry.update(diverged={str(s): e for s, e in sorted(diverged.items())}, collapsed=sorted(collapsed))
        curve = _mean_curve([cells[s]['history'] for s in sorted(cells)])
        entry['curve'] = curve
        if not row.is_baseline:
            base = base_scores[row.family]
            deltas = [scores[s] - base[s] for s in sorted(scores) if s in base]
            dm, ds = _mean_std(deltas)
            entry.update(delta=deltas, delta_mean=dm, delta_std=ds)
            entry['significant'] = (dm is not None and ds is not None and len(deltas) >= 2
                                    and abs(dm) >= 2 * ds / math.sqrt(len(deltas)))
            mid = row.paper_mid
            entry['sign_agrees'] = None if dm is None or dm == 0 else (dm < 0) == (mid < 0)
        out_rows.append(entry)
    taus = {}
    for table in TABLES:
        tab = [e for e in out_rows if e['table'] == table and not e['baseline'] and e.get('delta_mean') is not None]
        agree, total = 0, 0
        for e in tab:
            a, n = 0, 0
            for o in tab:
                if o is e or o['paper_delta_mid'] == e['paper_delta_mid'] or o['delta_mean'] == e['delta_mean']:
                    continue
                n += 1
                a += (o['paper_delta_mid'] < e['paper_delta_mid']) == (o['delta_mean'] < e['delta_mean'])
            e['order_agree'], e['order_pairs'] = a, n
            agree += a
            total += n
        # each pair is counted twice above; tau = (concordant - discordant) / pairs
        taus[table] = None if total == 0 else (2 * agree - total) / total
    return dict(format=REPORT_FORMAT, settings=dict(settings or {}), num_classes=num_classes, chance=chance,
                seeds=list(seeds), models=dict(models), rows=out_rows, kendall_tau=taus,
                cells=[dict(r) for _, r in sorted(results.items())])


def _mean_curve(histories: Sequence[Sequence[Mapping[str, Any]]]) -> List[Dict[str, Any]]:
    """Per epoch: mean val top-1 and train loss over the seeds that reached it."""
    by_epoch: Dict[int, List[Mapping[str, Any]]] = {}
    for h in histories:
        for r in h:
            by_epoch.setdefault(int(r['epoch']), []).append(r)
    curve = []
    for ep in sorted(by_epoch):
        rs = by_epoch[ep]
        vt = [r['val_top1'] for r in rs if r.get('val_top1') is not None]
        tl = [r['train_loss'] for r in rs if r.get('train_loss') is not None and math.isfinite(r['train_loss'])]
        curve.append(dict(epoch=ep, seeds=len(rs), val_top1=sum(vt) / len(vt) if vt else None,
                          train_loss=sum(tl) / len(tl) if tl else None))
    return curve


# --------------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------------

def _pm(mean: Optional[float], std: Optional[float], signed: bool = False) -> str:
    if mean is None:
        return '—'
    s = f'{mean:+.2f}' if signed else f'{mean:.2f}'
    return s + (f' ± {std:.2f}' if std is not None else '')


def _note(e: Mapping[str, Any], n_seeds: int) -> str:
    notes = []
    if e['diverged']:
        eps = sorted(set(e['diverged'].values()))
        notes.append(f'diverged in {len(e["diverged"])}/{n_seeds} seeds (non-finite loss in epoch '
                     f'{", ".join(str(x) for x in eps)})')
    if e['collapsed']:
        notes.append(f'collapsed in {len(e["collapsed"])}/{n_seeds} seeds (≤ {COLLAPSE_FACTOR:g} × chance)')
    return '; '.join(notes)


def _paper_text(e: Mapping[str, Any]) -> str:
    lo, hi = e['paper_delta']
    return f'{lo:+.1f}' if lo == hi else f'{hi:+.1f} to {lo:+.1f}'


def format_table(report: Mapping[str, Any]) -> str:
    """The tables as Markdown, in the paper's layout and order."""
    lines: List[str] = []
    n = len(report['seeds'])
    for table, title in TABLES.items():
        entries = [e for e in report['rows'] if e['table'] == table]
        if table == 'stabilisation':   # the conv baseline heads this table too
            base = [e for e in report['rows'] if e['row'] == BASELINES['conv']]
            entries = base + entries
        if not any(not e['baseline'] for e in entries):
            continue
        lines += [f'### {title}', '',
                  '| row | option | top-1 (%) | Δ top-1 | paper Δ | sign | order | note |',
                  '|---|---|---|---|---|---|---|---|']
        for e in entries:
            if e['baseline']:
                lines.append(f'| **{e["label"]}** (`{e["model"]}`) | — | {_pm(e["top1_mean"], e["top1_std"])} | — | '
                             f'({e["paper_top1"]:.1f} on ImageNet) | | | {_note(e, n)} |')
                continue
            sign = '—' if e.get('sign_agrees') is None else ('✓' if e['sign_agrees'] else '✗')
            if e.get('sign_agrees') is not None and not e.get('significant'):
                sign += ' (n.s.)'
            order = f'{e["order_agree"]}/{e["order_pairs"]}' if e.get('order_pairs') else '—'
            lines.append(f'| {e["label"]} | `{e["row"]}` | {_pm(e["top1_mean"], e["top1_std"])} | '
                         f'{_pm(e.get("delta_mean"), e.get("delta_std"), signed=True)} | '
                         f'{_paper_text(e)} | {sign} | {order} | {_note(e, n)} |')
        tau = report['kendall_tau'].get(table)
        lines += ['', f'Kendall τ between the measured and the paper\'s order of the Δs: '
                      f'{"—" if tau is None else f"{tau:+.2f}"}', '']
    return '\n'.join(lines)


def _header(report: Mapping[str, Any]) -> str:
    st = report['settings']
    bits = [f'recipe `{st.get("recipe")}`', f'models {", ".join(f"`{m}`" for m in report["models"].values())}']
    if st.get('init_channels') is not None:
        bits.append(f'C0 = {st["init_channels"]}')
    bits += [f'{st.get("epochs")} epochs', f'{len(report["seeds"])} seeds ({", ".join(map(str, report["seeds"]))})',
             f'{st.get("data")}', f'{report["num_classes"]} classes (chance {report["chance"]:.1f} %)']
    if st.get('cpu_s_per_cell') is not None:
        threads = '/'.join(str(t) for t in st.get('cell_threads') or [])
        bits.append(f'per cell {st["cpu_s_per_cell"]:.0f} CPU-s, {st["wall_s_per_cell"]:.0f} s wall '
                    f'({threads} thread(s) each' + ''.join(f'; {d}' for d in st.get('devices') or []) + ')')
    return ('# PolyNeXt ablations\n\n' + ' · '.join(b for b in bits if b) +
            '\n\ntop-1: val top-1 after the last epoch, mean ± std over seeds; Δ: paired against the baseline of '
            'the same model family and seed; sign ✓ / ✗: the measured Δ has / has not the paper\'s sign, (n.s.): '
            '|mean Δ| < 2 standard errors; order: pairs of rows of the table ordered as in the paper.\n')


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------

def write_report(report: Dict[str, Any], folder: Path) -> Dict[str, Path]:
    """Write the Markdown table, JSON, CSVs and the two figures into ``folder`` (atomically)."""
    folder = Path(folder)
    paths = {k: folder / v for k, v in REPORT_FILES.items()}
    text = _header(report) + '\n' + format_table(report)
    atomic_write(paths['table'], lambda tmp: Path(tmp).write_text(text))
    atomic_write(paths['json'], lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1) + '\n'))
    flat = [{k: v for k, v in e.items() if k != 'curve'} for e in report['rows']]
    atomic_write(paths['csv'], lambda tmp: Path(tmp).write_text(csv_text(flat)))
    cells = [{k: v for k, v in c.items() if k not in ('history', 'format')} for c in report['cells']]
    atomic_write(paths['cells_csv'], lambda tmp: Path(tmp).write_text(csv_text(cells)))
    _plot_deltas(report, paths['deltas'])
    _plot_curves(report, paths['curves'])
    return paths


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _plot_deltas(report: Mapping[str, Any], path: Path) -> None:
    """Horizontal bars per table: measured Δ (± std over seeds) beside the paper's Δ."""
    tables = [t for t in TABLES if any(e['table'] == t and not e['baseline'] for e in report['rows'])]
    if not tables:
        return
    sizes = [sum(1 for e in report['rows'] if e['table'] == t and not e['baseline']) for t in tables]
    fig = _figure(9.0, 1.2 + 0.55 * sum(sizes) + 0.8 * len(tables))
    axes = fig.subplots(len(tables), 1, squeeze=False, gridspec_kw=dict(height_ratios=sizes))[:, 0]
    for ax, table in zip(axes, tables):
        entries = [e for e in report['rows'] if e['table'] == table and not e['baseline']]
        ys = list(range(len(entries)))[::-1]
        meas = [e.get('delta_mean') or 0.0 for e in entries]
        err = [e.get('delta_std') or 0.0 for e in entries]
        paper = [e['paper_delta_mid'] for e in entries]
        h = 0.38
        ax.barh([y + h / 2 for y in ys], meas, height=h, xerr=err, color='tab:blue', capsize=3,
                label=f'measured (mean ± std, {len(report["seeds"])} seeds)')
        ax.barh([y - h / 2 for y in ys], paper, height=h, color='tab:gray', alpha=0.6, label='paper (ImageNet-1k)')
        for y, e in zip(ys, entries):
            if e['diverged']:
                ax.annotate('diverged', (e.get('delta_mean') or 0.0, y + h / 2), fontsize=7, color='tab:red',
                            xytext=(4, -3), textcoords='offset points')
        ax.axvline(0, color='black', lw=0.8)
        ax.set_yticks(ys)
        ax.set_yticklabels([e['label'] + (' [A]' if e['family'] == 'attn' else '') for e in entries], fontsize=8)
        ax.set_title(TABLES[table], fontsize=10)
        ax.set_xlabel('Δ top-1 against the baseline (points)')
        ax.grid(axis='x', alpha=0.3)
        ax.legend(fontsize=7, loc='lower left')
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png'))


def _plot_curves(report: Mapping[str, Any], path: Path) -> None:
    """Val top-1 against epoch, one line per row (mean over seeds), one panel per table."""
    panels = []
    for table, title in TABLES.items():
        entries = [e for e in report['rows'] if e['table'] == table]
        if table == 'stabilisation':
            entries = [e for e in report['rows'] if e['row'] == BASELINES['conv']] + entries
        if any(not e['baseline'] for e in entries):
            panels.append((title, entries))
    if not panels:
        return
    fig = _figure(6.2 * len(panels), 4.6)
    import matplotlib
    cmap = matplotlib.colormaps['tab10']
    for i, (title, entries) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for j, e in enumerate(entries):
            pts = [(p['epoch'], p['val_top1']) for p in e['curve'] if p['val_top1'] is not None]
            if not pts:
                continue
            xs, ys = zip(*pts)
            style = dict(lw=2.2, color='black') if e['baseline'] else dict(lw=1.3, color=cmap(j % 10))
            if e['baseline'] and e['family'] == 'attn':
                style.update(ls='--')
            ax.plot(xs, ys, marker='o', ms=3, label=e['label'], **style)
            if e['diverged']:
                ax.plot(xs[-1], ys[-1], marker='x', ms=8, color=style['color'])
        ax.axhline(report['chance'], color='gray', lw=0.8, ls=':', label='chance')
        ax.set_title(title, fontsize=10)
        ax.set_xlabel('epoch')
        ax.set_ylabel('val top-1 (%), mean over seeds')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png'))
