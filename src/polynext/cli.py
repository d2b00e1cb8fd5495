"""The ``polynext`` command line.

Each sub-command lives in its own module that defines ``add_arguments(parser)`` and
``run(args) -> int``; this table is the one place that lists them. Only the chosen
command's module is imported. User errors (``PolyNeXtError``) are printed as one line.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional

COMMANDS = {
    'models': ('polynext.commands.models', 'list every model polynext offers, with params and MACs'),
    'convert': ('polynext.commands.convert', "convert a checkpoint (authors' .pt/.pth) to polynext safetensors"),
    'train': ('polynext.commands.train', 'train a classifier: paper recipes as presets, or your own data'),
    'validate': ('polynext.commands.validate', 'top-1 / top-5 / per-class accuracy of a checkpoint on a dataset'),
    'robustness': ('polynext.commands.robustness', 'ImageNet-C mCE, ImageNet-A / -R, Sketch: one or several models'),
    'bench': ('polynext.commands.bench', 'params, MACs, images/s and peak memory of models, side by side'),
    'ablate': ('polynext.commands.ablate', "re-run the paper's ablation tables (every row × seeds) with one command"),
    'profile': ('polynext.commands.profile', 'where the time goes: a step by op class against the machine peaks'),
    'fhe': ('polynext.commands.fhe', 'encrypted inference (CKKS): fhe analyze / fhe demo / fhe moonshot'),
    'seg': ('polynext.commands.seg', 'semantic segmentation (UperNet, ADE20K): seg train / seg eval / seg cost'),
    'det': ('polynext.commands.det', 'detection and instance segmentation (Mask R-CNN, Cascade, COCO): det train / eval / cost'),
    'export': ('polynext.commands.export', 'ONNX / torch.export / Hugging Face Hub export, checked against eager'),
    'push': ('polynext.commands.push', 'upload a Hub folder (polynext export --format hub) to the Hugging Face Hub'),
}


def _top_parser() -> argparse.ArgumentParser:
    width = max(len(c) for c in COMMANDS)
    listing = '\n'.join(f'  {name:<{width}}  {help_}' for name, (_, help_) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog='polynext', formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Activation-free polynomial vision backbones (PolyNeXt) and MetaFormer baselines.',
        epilog=f'commands:\n{listing}\n\nRun `polynext COMMAND --help` for the options of a command.')
    parser.add_argument('command', nargs='?', help='one of the commands below')
    parser.add_argument('--version', action='store_true', help='print the version and exit')
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] in ('-h', '--help') or argv[0] == '--version':
        args = top.parse_args(argv[:1])
        if args.version:
            from . import __version__
            print(__version__)
            return 0
        top.print_help()
        return 0
    name = argv[0]
    if name not in COMMANDS:
        import difflib
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ''
        print(f"polynext: error: unknown command '{name}'.{hint} Run `polynext --help` for the list.", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f'polynext {name}', description=module.__doc__ or help_,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    from .errors import PolyNeXtError
    from .outputs import WRITE_ERRNOS
    # under torchrun (RANK) or srun (SLURM_PROCID, before init_distributed set RANK) rank 0 alone reports an error
    main_rank = int(os.environ.get('RANK', os.environ.get('SLURM_PROCID', '0'))) == 0
    try:
        return int(module.run(args) or 0)
    except PolyNeXtError as e:
        if main_rank:
            print(f'polynext {name}: error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:   # a run's Interrupted says how to resume
        if main_rank:
            print(f'polynext {name}: interrupted' + (f'; {e}' if str(e) else ''), file=sys.stderr)
        return 130
    except OSError as e:
        # the file system refused something no check foresaw (a path, permissions, space): one line, not a traceback
        if e.errno not in WRITE_ERRNOS:
            raise
        if main_rank:
            where = f'{e.filename}: ' if e.filename else ''
            print(f'polynext {name}: error: {where}{e.strerror}; check the path, its permissions and the free '
                  f'disk space', file=sys.stderr)
        return 2
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == '__main__':
    sys.exit(main())
