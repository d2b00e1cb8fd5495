"""Named recipes (presets), one mechanism for every task: get, list, resolve, ``--show-config``.

A task defines a typed config dataclass and fills one ``PresetTable`` with its recipes::

    PRESETS = PresetTable(TrainConfig, default='cpolynext_lr_digits')
    PRESETS.add('cpolynext_s', TrainConfig(...), source="spec §9 (authors' scripts/CPolyNeXt_S.sh)")

The config class tells the table what it needs as class attributes:

* ``COMMAND``: the command that trains it (``'polynext train'``), named in messages;
* ``MODEL_FIELDS``: (model name field, its keyword-arguments field): a model given on the command
  line that differs from the recipe's drops the recipe's model arguments;
* ``DATA_DATASETS``: {built-in dataset: dataset kind that ``--data DIR`` means}, so that ``--data``
  on a demo recipe reads a folder;
* ``summary()``: the columns of ``--list-recipes``;
* ``validate()``: one clear ``ConfigError`` for an impossible value.

``resolve`` applies the overrides in one order for every task: recipe < ``--config FILE.yaml`` <
``--usual`` fidelity flags < command-line flags < ``--set key=value``. The base recipe is the one
named, else the YAML file's ``recipe:`` key, else the recipe named like the model flag, else the
table's default. ``run_command`` is the whole ``train`` sub-command of a task (list, show, train).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Generic, Iterator, List, Mapping, Optional, Sequence, Tuple, TypeVar

from ..errors import ConfigError
from .config import apply_overrides, config_to_dict, load_yaml, parse_set_args

__all__ = ['Preset', 'PresetTable', 'FidelityFlag', 'Resolved']

C = TypeVar('C')


@dataclass(frozen=True)
class Preset(Generic[C]):
    """A named recipe: its config, where its values come from, and whether it fine-tunes a trained model."""
    config: C
    source: str
    needs_checkpoint: bool = False     # fine-tuning recipes need --initial-checkpoint


@dataclass(frozen=True)
class FidelityFlag:
    """A reference quirk that a recipe keeps, and the usual practice ``--usual NAME`` switches to."""
    field: str
    usual: Any
    reference: str      # what the reference does
    practice: str       # what the usual value does


@dataclass(frozen=True)
class Resolved(Generic[C]):
    """A resolved recipe: its name, the config after every override and the keys set explicitly."""
    name: str
    config: C
    explicit: Dict[str, Any]


class PresetTable(Generic[C]):
    """The named recipes of one task (see the module doc)."""

    def __init__(self, config_cls: type, default: str, fidelity: Optional[Mapping[str, FidelityFlag]] = None):
        self.config_cls = config_cls
        self.default = default
        self.fidelity: Dict[str, FidelityFlag] = dict(fidelity or {})
        self._presets: Dict[str, Preset] = {}

    @property
    def command(self) -> str:
        return self.config_cls.COMMAND

    # ---- the table ------------------------------------------------------------------------
    def add(self, name: str, config: C, source: str, needs_checkpoint: bool = False) -> Preset:
        if name in self._presets:
            raise ValueError(f'recipe {name!r} is defined twice')
        self._presets[name] = Preset(config, source, needs_checkpoint)
        return self._presets[name]

    def alias(self, name: str, target: str) -> None:
        """``name`` is another name of the recipe ``target``."""
        self._presets[name] = self._presets[target]

    def __contains__(self, name: object) -> bool:
        return name in self._presets

    def __iter__(self) -> Iterator[str]:
        return iter(self._presets)

    def __len__(self) -> int:
        return len(self._presets)

    def items(self):
        return self._presets.items()

    def names(self, pattern: str = '') -> List[str]:
        """Recipe names containing ``pattern``, in definition order."""
        return [n for n in self._presets if pattern in n]

    def get(self, name: str) -> Preset:
        """The named recipe, or a ``ConfigError`` naming the closest ones."""
        if name in self._presets:
            return self._presets[name]
        close = difflib.get_close_matches(name, list(self._presets), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ''
        raise ConfigError(f"unknown recipe '{name}'.{hint} `{self.command} --list-recipes` lists them.")

    __getitem__ = get

    def source(self, name: str) -> Optional[str]:
        """Where the named recipe's values come from (``None`` for a name that is not a recipe)."""
        return self._presets[name].source if name in self._presets else None

    # ---- overrides -------------------------------------------------------------------------
    def usual_practice(self, names: Sequence[str]) -> Dict[str, Any]:
        """``{field: usual value}`` for the named fidelity flags ('all' = every one)."""
        names = list(names or [])
        if 'all' in names:
            names = list(self.fidelity)
        out = {}
        for n in names:
            if n not in self.fidelity:
                close = difflib.get_close_matches(n, list(self.fidelity), n=1) or [f for f in self.fidelity
                                                                                   if f.startswith(n)]
                hint = f" Did you mean '{close[0]}'?" if close else ''
                choices = ', '.join(list(self.fidelity) + ['all']) if self.fidelity else 'none for this task'
                raise ConfigError(f"unknown fidelity flag '{n}'.{hint} Choose from: {choices}")
            flag = self.fidelity[n]
            out[flag.field] = flag.usual
        return out

    def resolve(self, recipe: Optional[str] = None, config_file: Optional[str] = None,
                flags: Optional[Mapping[str, Any]] = None, set_items: Optional[Sequence[str]] = None,
                usual: Optional[Sequence[str]] = None) -> Tuple[str, C]:
        """The recipe name and its config after every override (see the module doc); validated."""
        resolved = self.resolve_explicit(recipe, config_file, flags, set_items, usual)
        return resolved.name, resolved.config

    def resolve_explicit(self, recipe: Optional[str] = None, config_file: Optional[str] = None,
                         flags: Optional[Mapping[str, Any]] = None, set_items: Optional[Sequence[str]] = None,
                         usual: Optional[Sequence[str]] = None) -> Resolved:
        """``resolve`` plus the keys set by flags or ``--set`` with their resolved values."""
        cls = self.config_cls
        file_values = load_yaml(config_file) if config_file else {}
        file_recipe = file_values.pop('recipe', None)
        flags = {k: v for k, v in (flags or {}).items() if v is not None}
        set_values = parse_set_args(set_items or [])
        given = list(dict.fromkeys(list(flags) + list(set_values)))
        model_field, kwargs_field = cls.MODEL_FIELDS
        model_flag = flags.get(model_field)
        name = recipe or file_recipe or (model_flag if model_flag in self else None) or self.default
        cfg = self.get(name).config
        cfg = apply_overrides(cfg, file_values, source=str(config_file))
        cfg = apply_overrides(cfg, self.usual_practice(usual or []), source='--usual')
        if model_flag and model_flag != getattr(cfg, model_field) and kwargs_field not in set_values \
                and kwargs_field not in file_values:
            flags[kwargs_field] = {}     # the recipe's extra model arguments belong to its own model
        data_kind = cls.DATA_DATASETS.get(getattr(cfg, 'dataset', None))
        if 'data' in flags and data_kind and 'dataset' not in flags and 'dataset' not in set_values:
            flags['dataset'] = data_kind    # --data on a built-in dataset means the task's folder layout
        cfg = apply_overrides(cfg, flags, source='the command line')
        cfg = apply_overrides(cfg, set_values, source='--set').validate()
        return Resolved(name, cfg, {k: getattr(cfg, k) for k in given})

    # ---- output -----------------------------------------------------------------------------
    def show_config(self, name: str, cfg: C) -> str:
        """The resolved config as YAML (what ``--show-config`` prints and ``config.yaml`` holds)."""
        import yaml
        return yaml.safe_dump(dict(recipe=name, **config_to_dict(cfg)), sort_keys=False, default_flow_style=None)

    def listing(self) -> str:
        """One line per recipe: name, the config's ``summary()`` columns, and the source."""
        rows = [dict(recipe=name, **preset.config.summary(), source=preset.source)
                for name, preset in self._presets.items()]
        columns = list(rows[0])
        widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns[:-1]}
        fmt = lambda r: '  '.join(f'{str(r[c]):<{widths[c]}}' for c in columns[:-1]) + '  ' + str(r['source'])
        return '\n'.join([fmt({c: c for c in columns})] + [fmt(r) for r in rows])

    # ---- the train command ---------------------------------------------------------------------
    def run_command(self, train: Callable[..., Any], *, recipe: Optional[str] = None,
                    config_file: Optional[str] = None, flags: Optional[Mapping[str, Any]] = None,
                    set_items: Sequence[str] = (), usual: Sequence[str] = (), resume: Optional[str] = None,
                    fresh: bool = False, list_recipes: bool = False, show_config: bool = False,
                    show_progress: bool = True) -> int:
        """A task's ``train`` command: ``--list-recipes``, ``--show-config``, or ``train(cfg, recipe, resume=...,
        fresh=..., explicit=..., show_progress=...)`` (the task's entry function); 0 on success.

        On ``--resume`` the run's saved config is the base, so the recipe is not resolved: only the keys
        given explicitly are checked, against the saved ones."""
        if list_recipes:
            print(self.listing())
            return 0
        if resume and not show_config:
            flags = {k: v for k, v in (flags or {}).items() if v is not None}
            explicit_values = {**flags, **parse_set_args(set_items)}
            cfg = apply_overrides(self.config_cls(), explicit_values, source='the command line')
            resolved = Resolved(recipe or '', cfg, {k: getattr(cfg, k) for k in explicit_values})
        else:
            resolved = self.resolve_explicit(recipe, config_file, flags, set_items, usual)
        if show_config:
            print(self.show_config(resolved.name, resolved.config), end='')
            return 0
        train(resolved.config, resolved.name, resume=resume, fresh=fresh, explicit=resolved.explicit,
              show_progress=show_progress)
        return 0
