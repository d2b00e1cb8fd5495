"""Typed configuration dataclasses: overrides from ``key=value`` strings and YAML, with one
clear error for an unknown key or a value of the wrong type.

Generic over any dataclass (the classification ``TrainConfig``, the segmentation config):

* ``apply_overrides(cfg, {'lr': '4e-3', ...}, source='--set')`` returns a new config; each
  value is parsed as YAML (``true``, ``1e-3``, ``[0.08, 1.0]``, ``null``) and checked against
  the field's annotation (bool / int / float / str / Optional / Tuple / Dict / Literal-like
  choices via ``cfg.validate()``).
* ``parse_set_args(['lr=1e-3', 'ema=true'])`` splits ``--set`` arguments.
* ``load_yaml(path)`` / ``dump_yaml(cfg, path)`` read / write a config file (atomically).
* ``config_diff(a, b)`` lists the fields that differ (for safe auto-resume).
* ``check_fields(cfg, ...)`` / ``check_device(device)``: the value checks every task's
  ``validate()`` makes (choices, positive, non-negative, fractions), each with one clear message.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Tuple, TypeVar, Union

import yaml

from ..errors import ConfigError

__all__ = ['apply_overrides', 'parse_set_args', 'load_yaml', 'dump_yaml', 'config_to_dict', 'config_diff',
           'coerce_value', 'check_fields', 'check_device']

C = TypeVar('C')


def _field_types(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return ' or '.join(_type_name(a) for a in args) + ' or null'
    if origin in (tuple, Tuple):
        return 'a list [' + ', '.join(_type_name(a) for a in typing.get_args(tp) if a is not Ellipsis) + ']'
    if origin in (dict, Dict):
        return 'a mapping {key: value}'
    if origin in (list, List):
        return 'a list'
    return {bool: 'true/false', int: 'an integer', float: 'a number', str: 'a string'}.get(tp, str(tp))


def coerce_value(key: str, value: Any, tp: Any) -> Any:
    """Check / convert one value against a type annotation; ``ConfigError`` if it does not fit."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"bad value for '{key}': {value!r} is not {_type_name(tp)}")
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ('none', 'null', '~') and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce_value(key, value, a)
            except ConfigError:
                continue
        raise bad
    if origin in (tuple, Tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if isinstance(value, str) and value.strip().startswith('['):   # a YAML list: '[64, 32]'
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise bad from None
        elif isinstance(value, str):
            value = [yaml.safe_load(v) for v in value.split(',')] if ',' in value else [yaml.safe_load(value)]
        if not isinstance(value, (list, tuple)):
            raise bad
        if Ellipsis in typing.get_args(tp):
            return tuple(coerce_value(key, v, args[0]) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"bad value for '{key}': {value!r} needs {len(args)} entries ({_type_name(tp)})")
        return tuple(coerce_value(key, v, a) for v, a in zip(value, args))
    if origin in (dict, Dict):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise bad
        return dict(value)
    if origin in (list, List):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise bad
        return list(value)
    if tp is Any:
        return value
    if isinstance(value, str) and tp in (int, float):
        text = value.strip()
        try:   # YAML 1.1 reads '1e-3' as a string; Python's parsers take every usual spelling
            return int(text) if tp is int else float(text)
        except ValueError:
            raise bad from None
    if isinstance(value, str) and tp is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise bad from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise bad
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise bad
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if value is None or isinstance(value, (dict, list)):
            raise bad
        return str(value)
    return value


def _unknown_key(cls, key: str, source: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ''
    command = getattr(cls, 'COMMAND', 'polynext train')
    return ConfigError(f"unknown config key '{key}' in {source}.{hint} `{command} --show-config` lists the keys.")


def apply_overrides(cfg: C, overrides: Mapping[str, Any], source: str = 'overrides') -> C:
    """A copy of dataclass ``cfg`` with ``overrides`` applied (values type-checked)."""
    cls = type(cfg)
    types = _field_types(cls)
    changes = {}
    for key, value in overrides.items():
        if key not in types or key.startswith('_'):
            raise _unknown_key(cls, key, source)
        changes[key] = coerce_value(key, value, types[key])
    return dataclasses.replace(cfg, **changes)


def parse_set_args(items: Iterable[str]) -> Dict[str, str]:
    """``['lr=1e-3', 'ema=true']`` → ``{'lr': '1e-3', 'ema': 'true'}`` (values parsed later)."""
    out = {}
    for item in items or ():
        if '=' not in item:
            raise ConfigError(f"bad --set argument '{item}': write it as key=value (e.g. --set lr=1e-3)")
        key, value = item.split('=', 1)
        key = key.strip().replace('-', '_')
        if not key:
            raise ConfigError(f"bad --set argument '{item}': the key is empty")
        out[key] = value.strip()
    return out


def load_yaml(path: Union[str, Path]) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f'config file not found: {path}')
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        line = getattr(getattr(e, 'problem_mark', None), 'line', None)
        where = f' (line {line + 1})' if line is not None else ''
        raise ConfigError(f'cannot parse {path} as YAML{where}: {getattr(e, "problem", e)}') from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f'{path} must hold a mapping of config keys to values, not a {type(data).__name__}')
    return data


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    """Plain (YAML/JSON-safe) dict of a dataclass config, in field order."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def dump_yaml(data: Union[Mapping[str, Any], Any], path: Union[str, Path], header: str = '') -> Path:
    from ..checkpoint import atomic_write
    if dataclasses.is_dataclass(data):
        data = config_to_dict(data)
    text = (header + '\n' if header else '') + yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=None)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def config_diff(a: Mapping[str, Any], b: Mapping[str, Any], ignore: Iterable[str] = ()) -> List[Tuple[str, Any, Any]]:
    """``[(key, a_value, b_value)]`` for keys whose values differ (lists and tuples compare equal)."""
    ignore = set(ignore)
    out = []
    for k in list(a) + [k for k in b if k not in a]:
        if k in ignore:
            continue
        va, vb = _plain(a.get(k)), _plain(b.get(k))
        if va != vb:
            out.append((k, va, vb))
    return out


def check_fields(cfg: Any, choices: Mapping[str, Iterable[Any]] = (), positive: Iterable[str] = (),
                 non_negative: Iterable[str] = (), fractions: Iterable[str] = ()) -> None:
    """``ConfigError`` for the first field of ``cfg`` outside its choices, not > 0, not >= 0, or not in [0, 1]."""
    for name, allowed in dict(choices).items():
        allowed = tuple(allowed)
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"bad value for '{name}': {getattr(cfg, name)!r}; choose one of {', '.join(allowed)}")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"bad value for '{name}': {getattr(cfg, name)}; it must be positive")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"bad value for '{name}': {getattr(cfg, name)}; it must be >= 0")
    for name in fractions:
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ConfigError(f"bad value for '{name}': {getattr(cfg, name)}; it must be between 0 and 1")


def check_device(device: str) -> None:
    """``ConfigError`` unless ``device`` is auto, cpu, cuda or cuda:N."""
    if not (device in ('auto', 'cpu', 'cuda') or device.startswith('cuda:')):
        raise ConfigError(f"bad value for 'device': {device!r}; choose auto, cpu, cuda or cuda:N")
