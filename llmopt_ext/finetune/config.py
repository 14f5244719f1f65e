"""``--config run.yaml`` for ``llmopt-finetune``: a YAML mapping of the CLI's options that
becomes the parser's defaults, so flags on the command line override it (the Axolotl / TRL
convention). Keys are the long option names, with ``-`` or ``_`` (``max-steps``,
``max_steps``, ``no_eval: true``) or the option's destination (``eval: false``). Every run saves
its resolved options as ``config.yaml`` in its output directory: ``--config <out>/config.yaml``
repeats it."""
from __future__ import annotations

import argparse
import os

CONFIG_NAME = "config.yaml"
_SKIP = ("help", "config")  # not options of a run (a config cannot point at another config)


class ConfigError(ValueError):
    """A bad --config file: the message names the file and the key."""


def _yaml():
    try:
        import yaml
    except ImportError:
        raise ConfigError("--config needs PyYAML: pip install pyyaml") from None
    return yaml


def _option_tables(parser: argparse.ArgumentParser):
    by_dest: dict[str, argparse.Action] = {}
    by_flag: dict[str, argparse.Action] = {}
    for a in parser._actions:
        if a.dest in _SKIP:
            continue
        by_dest.setdefault(a.dest, a)
        for s in a.option_strings:
            if s.startswith("--"):
                by_flag[s[2:].replace("-", "_")] = a
    return by_dest, by_flag


def _is_flag(a: argparse.Action) -> bool:
    return a.nargs == 0  # store_true / store_false: the option takes no value


def _typed(a: argparse.Action, key: str, value, where: str):
    """``value`` checked (and converted) as the command line would: YAML gives 1e-3 as a
    string (YAML 1.1 floats need a dot), so strings go through the option's type."""
    if value is None:
        return None
    if _is_flag(a):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key!r} must be true or false, got {value!r}")
        return value
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{where}: {key!r} must be a single value, got {type(value).__name__}")
    if a.type is int and (isinstance(value, bool) or (isinstance(value, float) and value != int(value))):
        raise ConfigError(f"{where}: {key!r} must be an integer, got {value!r}")
    if a.type is not None:
        try:
            value = a.type(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {key!r}: invalid {a.type.__name__} value {value!r}") from None
    elif not isinstance(value, str):
        value = str(value)
    if a.choices is not None and value not in a.choices:
        raise ConfigError(f"{where}: {key!r} must be one of {', '.join(map(str, a.choices))}, "
                          f"got {value!r}")
    return value


def config_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    """The parser defaults (destination -> value) a YAML config file sets."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file")
    yaml = _yaml()
    with open(path, encoding="utf-8") as f:
        try:
            doc = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: invalid YAML: {e}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option: value, "
                          f"got {type(doc).__name__}")
    by_dest, by_flag = _option_tables(parser)
    out: dict = {}
    for key, value in doc.items():
        k = str(key).replace("-", "_")
        a = by_flag.get(k) or by_dest.get(k)
        if a is None:
            raise ConfigError(f"--config {path}: unknown key {key!r} (not an option of "
                              f"{parser.prog}; see --help)")
        value = _typed(a, str(key), value, f"--config {path}")
        if _is_flag(a) and k != a.dest:  # no_eval: true is --no-eval; no_eval: false its opposite
            value = a.const if value else not a.const
        out[a.dest] = value
    return out


def save_config(opts: argparse.Namespace, parser: argparse.ArgumentParser, path: str) -> None:
    """The run's resolved options (every option of ``parser``) as YAML."""
    by_dest, _ = _option_tables(parser)
    doc = {k: getattr(opts, k) for k in sorted(by_dest) if hasattr(opts, k)}
    with open(path, "w", encoding="utf-8") as f:
        _yaml().safe_dump(doc, f, sort_keys=True, default_flow_style=False)
