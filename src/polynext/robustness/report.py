"""Tables (printed) and files (JSON, CSV) of a robustness report.

Files in the output folder:

* ``robustness.json``: everything — per model: weights, clean / IN-A / IN-R / Sketch top-1 and
  top-5 with image counts, ImageNet-C per cell and per corruption (mean top-1, error, CE,
  relative CE), mCE, relative mCE, what is missing; the datasets and protocols; AlexNet's errors.
* ``summary.csv``: one row per model (the side-by-side comparison).
* ``imagenet_c.csv``: one row per model and corruption: top-1 at severities 1–5, mean, error,
  AlexNet error, CE (and relative CE).
* ``state.json``: the finished cells (what a resumed run reuses).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Dict, List, Sequence

from ..checkpoint import atomic_write
from .protocols import CORRUPTIONS, PROTOCOLS, SEVERITIES
from .runner import RobustnessReport

__all__ = ['write_report', 'summary_rows', 'imagenet_c_rows', 'format_report', 'comparison_table']

#: (column, dataset, field) of the summary, in table order
_SUMMARY = (('clean_top1', 'clean', 'top1'), ('mce', 'imagenet_c', 'mce'),
            ('relative_mce', 'imagenet_c', 'relative_mce'), ('imagenet_a_top1', 'imagenet_a', 'top1'),
            ('imagenet_r_top1', 'imagenet_r', 'top1'), ('sketch_top1', 'sketch', 'top1'))
_TITLES = {'clean_top1': 'clean', 'mce': 'mCE ↓', 'relative_mce': 'rel. mCE ↓', 'imagenet_a_top1': 'IN-A',
           'imagenet_r_top1': 'IN-R', 'sketch_top1': 'Sketch'}


def _columns(report: RobustnessReport) -> List[str]:
    present = set(report.datasets)
    cols = [col for col, ds, _ in _SUMMARY if ds in present]
    if not report.relative_mce and 'relative_mce' in cols:
        cols.remove('relative_mce')
    return cols


def summary_rows(report: RobustnessReport) -> List[Dict[str, Any]]:
    """One row per model: the headline numbers of each requested dataset."""
    cols = _columns(report)
    rows = []
    for m in report.models:
        row: Dict[str, Any] = dict(model=m['model'], weights=m['weights'])
        for col, ds, key in _SUMMARY:
            if col in cols:
                row[col] = (m.get(ds) or {}).get(key)
        if 'imagenet_c' in m:
            row['imagenet_c_complete'] = m['imagenet_c']['complete']
            row['imagenet_c_missing'] = ';'.join(m['imagenet_c']['missing'])
        rows.append(row)
    return rows


def imagenet_c_rows(report: RobustnessReport) -> List[Dict[str, Any]]:
    """One row per model and corruption (the 15 in order; a missing one with empty numbers)."""
    rows = []
    for m in report.models:
        c = m.get('imagenet_c')
        if not c:
            continue
        for name in CORRUPTIONS:
            s = c['corruptions'].get(name)
            row: Dict[str, Any] = dict(model=m['model'], corruption=name)
            for sev in SEVERITIES:
                row[f'severity_{sev}'] = s['top1'].get(str(sev)) if s else None
            row.update(mean_top1=s['mean_top1'] if s else None, error=s['error'] if s else None,
                       alexnet_error=s['alexnet_error'] if s else None, ce=s['ce'] if s else None)
            if report.relative_mce:
                row['relative_ce'] = s['relative_ce'] if s else None
            rows.append(row)
    return rows


def _csv_text(rows: Sequence[Dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: ('' if v is None else v) for k, v in r.items()})
    return buf.getvalue()


def write_report(report: RobustnessReport, folder: Path) -> List[Path]:
    """Write robustness.json, summary.csv and (with ImageNet-C) imagenet_c.csv atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {'robustness.json': json.dumps(report.as_dict(), indent=1, ensure_ascii=False) + '\n',
             'summary.csv': _csv_text(summary_rows(report))}
    if 'imagenet_c' in report.datasets:
        files['imagenet_c.csv'] = _csv_text(imagenet_c_rows(report))
    written = []
    for name, text in files.items():
        written.append(atomic_write(folder / name, lambda tmp, text=text: Path(tmp).write_text(text)))
    return written


# ---------------------------------------------------------------------------------------
# Text tables
# ---------------------------------------------------------------------------------------

def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return '—'
    if isinstance(v, float):
        return f'{v:.{nd}f}'
    return str(v)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str = '') -> str:
    """Columns padded to width; ``align`` has one 'l' / 'r' per column (default: first left, rest right)."""
    align = align or 'l' + 'r' * (len(headers) - 1)
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    just = lambda i, s: s.ljust(widths[i]) if align[i] == 'l' else s.rjust(widths[i])  # noqa: E731
    lines = ['  '.join(just(i, h) for i, h in enumerate(headers)).rstrip()]
    lines.append('  '.join('-' * w for w in widths))
    lines += ['  '.join(just(i, c) for i, c in enumerate(r)).rstrip() for r in rows]
    return '\n'.join(lines)


def _mce_text(c: Dict[str, Any], key: str) -> str:
    v = c.get(key)
    if v is None:
        return '—'
    return f'{v:.2f}' + ('' if c['complete'] else f' (partial: {c["corruptions_evaluated"]}/15)')


def _model_table(m: Dict[str, Any], report: RobustnessReport) -> str:
    rows = []
    if 'clean' in m:
        r = m['clean']
        rows.append(['clean top-1 (%)', _fmt(r['top1']), f"{r['images']} images, {PROTOCOLS['clean'].describe()}"])
    if 'imagenet_c' in m:
        c = m['imagenet_c']
        rows.append(['ImageNet-C mCE ↓', _mce_text(c, 'mce'), 'AlexNet-normalised, 15 corruptions × 5 severities'])
        if report.relative_mce:
            rows.append(['ImageNet-C relative mCE ↓', _mce_text(c, 'relative_mce'), 'needs the clean top-1'])
    for ds in ('imagenet_a', 'imagenet_r', 'sketch'):
        if ds in m:
            r = m[ds]
            rows.append([f'{PROTOCOLS[ds].title} top-1 (%)', _fmt(r['top1']), f"{r['images']} images, "
                         f"{PROTOCOLS[ds].describe()}"])
    head = f"{m['model']}" + (f"  ({m['weights']})" if m['weights'] else '')
    return head + '\n' + _table(['', 'value', 'details'], rows, align='lrl')


def _imagenet_c_table(m: Dict[str, Any], relative: bool) -> str:
    c = m['imagenet_c']
    headers = ['corruption'] + [str(s) for s in SEVERITIES] + ['mean', 'CE']
    if relative:
        headers.append('rel. CE')
    rows = []
    for name in CORRUPTIONS:
        s = c['corruptions'].get(name)
        if s is None:
            rows.append([name] + ['—'] * (len(headers) - 2) + ['missing'])
            continue
        row = [name] + [_fmt(s['top1'].get(str(sev))) for sev in SEVERITIES] + [_fmt(s['mean_top1']), _fmt(s['ce'])]
        if relative:
            row.append(_fmt(s['relative_ce']))
        rows.append(row)
    footer = ['mCE'] + [''] * len(SEVERITIES) + ['', _fmt(c['mce'])] + ([_fmt(c['relative_mce'])] if relative else [])
    rows.append(footer)
    return (f"ImageNet-C top-1 (%) of {m['model']} per corruption and severity; CE = 100 · (100 − mean) / AlexNet "
            f"error\n" + _table(headers, rows))


def comparison_table(report: RobustnessReport) -> str:
    cols = _columns(report)
    rows = []
    for r in summary_rows(report):
        row = [r['model']]
        for col in cols:
            v = r.get(col)
            text = _fmt(v)
            if col in ('mce', 'relative_mce') and v is not None and not r.get('imagenet_c_complete', True):
                text += '*'
            row.append(text)
        rows.append(row)
    table = _table(['model'] + [_TITLES[c] for c in cols], rows)
    if any(not r.get('imagenet_c_complete', True) for r in summary_rows(report)):
        table += '\n* partial ImageNet-C (see the missing cells above)'
    return 'side by side (top-1 %, mCE lower is better)\n' + table


def format_report(report: RobustnessReport) -> str:
    parts = []
    for m in report.models:
        parts.append(_model_table(m, report))
        if 'imagenet_c' in m:
            parts.append(_imagenet_c_table(m, report.relative_mce))
            if m['imagenet_c']['missing']:
                parts.append('missing ImageNet-C cells: ' + ', '.join(m['imagenet_c']['missing']))
    if len(report.models) > 1:
        parts.append(comparison_table(report))
    if report.notes:
        parts.append('\n'.join(f'note: {n}' for n in report.notes))
    return '\n\n'.join(parts)

