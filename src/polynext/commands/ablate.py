"""Re-run the PolyNeXt paper's ablation tables: every row trained under one recipe and the same
seeds, reported with error bars beside the paper's numbers.

With no arguments: all 16 rows of both tables (14 switches and the two baselines; the activation /
kernel rows and the stabilisation / architecture table on CPolyNeXt-T, the attention rows on
APolyNeXt-T, both at base width 16) on generated 64 px cluttered digits, 3 epochs, seeds 0-2:
48 training runs (their measured cost: README "Ablations"). Re-running the command skips the
finished runs.

Examples:
  polynext ablate                                             # the whole study (runs/ablate/)
  polynext ablate --rows hadamard_to_add,layerscale_1 --seeds 5
  polynext ablate --data ./my_images --epochs 30 --output runs/ablate_mine   # your own data
  polynext ablate --model cpolynext_s --init-channels 0 --recipe cpolynext_s --data /data/imagenet
  torchrun --nproc_per_node=8 -m polynext ablate --device cuda   # cells spread over 8 GPUs
  polynext ablate --list-rows

Writes OUTPUT/ablation.md (the tables), ablation.json / .csv, ablation_cells.csv,
ablation_deltas.png (Δ with error bars beside the paper's Δ), ablation_curves.png (val top-1
per epoch, one line per row) and one run folder per cell under OUTPUT/cells/.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..train.recipes import DATASETS
    parser.add_argument('--rows', action='append', default=[], metavar='ROW[,ROW...]',
                        help='rows to run (names from --list-rows; their baselines are added); default: all')
    parser.add_argument('--seeds', type=int, default=3, help='seeds 0..N-1 per row (default 3)')
    parser.add_argument('--epochs', type=int, default=None, help="epochs per run (default: the recipe's)")
    parser.add_argument('--data', default=None, metavar='DIR',
                        help='your own data: DIR/train/<class>/* and DIR/val/<class>/*')
    parser.add_argument('--dataset', default=None, choices=DATASETS, help="kind of dataset (default: the recipe's)")
    parser.add_argument('--model', default=None,
                        help="model of the conv rows (default: the recipe's, cpolynext_t); the attention rows use "
                             "its APolyNeXt twin")
    parser.add_argument('--attn-model', default=None, help='model of the attention rows (default: the twin of --model)')
    parser.add_argument('--init-channels', type=int, default=None, metavar='C0',
                        help="base width of both models (default: the recipe's, 16; 0: the model's own width)")
    parser.add_argument('--output', default=None, metavar='DIR', help='study folder (default: runs/ablate)')
    parser.add_argument('--recipe', default=None,
                        help='training recipe of every run (default: cluttered_digits; see polynext train --list-recipes)')
    parser.add_argument('--jobs', type=int, default=None,
                        help='runs trained at once, the CPU threads split between them (default: one per core on a '
                             'CPU, 1 on a GPU)')
    parser.add_argument('--device', default=None, help='auto | cpu | cuda')
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                        help='override any field of the recipe (repeatable), e.g. --set lr=2e-3')
    parser.add_argument('--keep-checkpoints', action='store_true',
                        help="keep each finished run's resume files (*.state.pt, best.*); by default only its "
                             "last weights, metrics and curve stay")
    parser.add_argument('--list-rows', action='store_true', help='list the rows with their switches and the paper\'s Δ')
    parser.add_argument('--plan', action='store_true', help='print the cells and which are finished, then exit')


def _list_rows() -> None:
    from ..ablate.rows import PAPER_ROWS, TABLES, row_options
    for table, title in TABLES.items():
        print(title)
        for r in PAPER_ROWS:
            if r.table != table:
                continue
            opt = ', '.join(f'{k}={v!r}' for k, v in row_options(r.name).items()) or '(published model)'
            fam = 'APolyNeXt' if r.family == 'attn' else 'CPolyNeXt'
            delta = r.paper_text or ''
            print(f'  {r.name:<24} {fam:<9} {delta:>13}  {r.label}  [{opt}]')


def run(args: argparse.Namespace) -> int:
    if args.list_rows:
        _list_rows()
        return 0
    from ..ablate.study import check_plan, make_plan, run_ablation
    rows = [r for item in args.rows for r in item.split(',')]
    plan = make_plan(recipe=args.recipe, rows=rows, seeds=args.seeds, epochs=args.epochs, data=args.data,
                     dataset=args.dataset, model=args.model, attn_model=args.attn_model,
                     init_channels=args.init_channels, output=args.output, set_items=args.set, device=args.device,
                     keep_checkpoints=args.keep_checkpoints)
    num_classes = check_plan(plan)
    if args.plan:
        from ..ablate.runner import load_result
        cells = plan.cells()
        done = 0
        for c in cells:
            res = load_result(c)
            done += res is not None
            state = 'finished' if res is not None else ('started' if (c.folder / 'last.state.pt').exists() else 'to do')
            print(f'{c.row:<24} seed {c.seed}  {plan.models[c.family]:<12} {plan.params[c.row]:>10,} params  '
                  f'{state:<8} {c.folder}')
        print(f'{len(cells)} cells, {done} finished')
        return 0
    run_ablation(plan, jobs=args.jobs, num_classes=num_classes)
    return 0
