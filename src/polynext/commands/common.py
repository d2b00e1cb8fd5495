"""Arguments that every task's ``train`` sub-command shares (``polynext train``, ``polynext seg train``, ...),
and the one call that runs it (``PresetTable.run_command``)."""
from __future__ import annotations

import argparse
from typing import Any, Callable, Mapping


def add_run_arguments(parser: argparse.ArgumentParser, default_recipe_help: str) -> None:
    """--recipe, --config, --set, --resume, --fresh, --on-nonfinite, --no-progress, --list-recipes, --show-config."""
    parser.add_argument('--recipe', default=None, help=f'named preset (default: {default_recipe_help}; '
                                                       f'see --list-recipes)')
    parser.add_argument('--config', default=None, metavar='FILE.yaml',
                        help="YAML file of config keys (a run folder's config.yaml repeats that run)")
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                        help='override any config key (repeatable), e.g. --set seed=1')
    parser.add_argument('--resume', default=None, metavar='PATH',
                        help='resume from a run folder or a *.state.pt file; with --set lr=... / clip_grad=... (the '
                             'optimisation settings) a diverged run goes on from its last good checkpoint')
    parser.add_argument('--fresh', action='store_true', help='start over even if the run folder holds a checkpoint')
    parser.add_argument('--on-nonfinite', default=None, choices=('stop', 'skip', 'rollback'),
                        help='at a NaN / infinite loss: stop with the command that recovers (default), skip the step, '
                             'or roll back to the last checkpoint with half the lr (at most --set nonfinite_limit=3 '
                             'times)')
    parser.add_argument('--no-progress', action='store_true', help='no progress bars')
    parser.add_argument('--list-recipes', action='store_true', help='list the named recipes and exit')
    parser.add_argument('--show-config', action='store_true', help='print the resolved config (YAML) and exit')


def run_recipe(args: argparse.Namespace, presets: Any, train: Callable[..., Any], flags: Mapping[str, str]) -> int:
    """``presets.run_command`` with the parsed arguments; ``flags``: command-line flag → config field."""
    return presets.run_command(
        train, recipe=args.recipe, config_file=args.config,
        flags={field: getattr(args, flag) for flag, field in dict(flags, on_nonfinite='on_nonfinite').items()},
        set_items=args.set,
        usual=getattr(args, 'usual', ()), resume=args.resume, fresh=args.fresh, list_recipes=args.list_recipes,
        show_config=args.show_config, show_progress=not args.no_progress)
