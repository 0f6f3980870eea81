"""The command line's flag machinery: flags built from the config dataclasses, TOML files, typo hints.

Every optional flag is registered with the default it has when neither the command line nor a
TOML file gives it; the values of a run are ``defaults <- TOML file <- command line``. Flags of
config fields (``TrainConfig``, ``GenerateConfig``, ``BasisConfig``) have no default here: a field
that nobody set takes the dataclass's own default, so each default lives in one place.

A ``--config`` file's top-level keys are the command's flags; its tables ``[basis]``, ``[train]``
and ``[generate]`` hold the settings of those configs (for commands that take them: ``webui``
takes ``[train]`` and ``[generate]``), below the top-level keys and the command line. Settings are
read by the library's own ``celebbasis.config.settings_from``, as ``TrainConfig.from_toml`` reads them.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from .config import CONFIGS, RENAMED, load_toml, settings_from
from .errors import InputError

UNSET = None  # a config field nobody set: the dataclass default applies


class Parser(argparse.ArgumentParser):
    """No prefix matching (``--step`` is not ``--steps``); records each optional flag's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.flag_defaults: dict[str, Any] = {}  # dest -> default
        self.flag_types: dict[str, Any] = {}  # dest -> what a TOML value must be
        self.flag_names: dict[str, str] = {}  # "batch-size", "batch_size" ... -> dest
        self.option_strings: list[str] = ["-h", "--help"]
        self.subparsers: dict[str, Parser] = {}
        self.flag_required: dict[str, str] = {}  # dest -> flag name, for flags the command line or TOML must give
        self.sections: dict[str, type] = {}  # TOML table -> the config whose settings it holds ("train": TrainConfig)
        self.flag_configs: list[type] = []  # the configs whose fields are flags of this command

    def _required_shown(self, fmt):
        """Usage and help show flags that the command line or ``--config`` must give as required (no brackets)."""
        actions = [a for a in self._actions if a.dest in self.flag_required]
        for a in actions:
            a.required = True
        try:
            return fmt()
        finally:
            for a in actions:
                a.required = False

    def format_usage(self) -> str:
        return self._required_shown(super().format_usage)

    def format_help(self) -> str:
        return self._required_shown(super().format_help)


def flag(parser: Parser, group, *names: str, default: Any = None, kind: Any = None, required: bool = False,
         **kwargs) -> argparse.Action:
    """``group.add_argument(*names, ...)`` whose value is absent from the namespace unless given.

    A ``required`` flag may come from the command line or the ``--config`` file; ``merged`` checks it.
    """
    if required:
        kwargs["help"] = kwargs.get("help", "") + " (required; may come from --config)"
    action = group.add_argument(*names, default=argparse.SUPPRESS, **kwargs)
    if required:
        parser.flag_required[action.dest] = max(action.option_strings, key=len)
    parser.flag_defaults[action.dest] = default
    parser.flag_types[action.dest] = kind or _kind(action)
    parser.option_strings += action.option_strings
    for name in action.option_strings:
        if name.startswith("--"):
            parser.flag_names[name[2:]] = action.dest
            parser.flag_names[name[2:].replace("-", "_")] = action.dest
    parser.flag_names[action.dest] = action.dest
    return action


def _kind(action: argparse.Action):
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return bool
    if isinstance(action, argparse._AppendAction):
        return list
    return action.type or str


def config_flags(parser: Parser, group, cls, skip: tuple[str, ...] = (), presets: dict[str, dict] | None = None) -> None:
    """One flag per field of the config dataclass ``cls``: type, help and choices from the field.

    The command also reads ``cls``'s table (``[train]``, ...) of a ``--config`` file. ``presets`` maps a
    flag to the settings it changes (``{"--toy": TRAIN_PRESETS["toy"]}``); each such field's help says so:
    ``(default: 0.1; 1.0 with --toy)``.
    """
    parser.flag_configs.append(cls)
    sections(parser, cls)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip or f.name in parser.flag_defaults:
            continue
        base = [t for t in typing.get_args(hints[f.name]) if t is not type(None)] or [hints[f.name]]
        typ = base[0]
        name = "--" + f.name.replace("_", "-")  # a setting has one name: its field's
        help_text = f.metadata.get("help", "")
        changed = "".join(f"; {values[f.name]} with {name}" for name, values in (presets or {}).items() if f.name in values)
        if f.default is not MISSING and f.default is not None and f.default is not False:
            help_text += f" (default: {f.default}{changed})"
        elif changed:
            help_text += f" ({changed[2:]})"
        help_text = help_text.replace("%", "%%")
        if typ is bool:  # a setting on by default is turned off with --no-NAME
            action = argparse.BooleanOptionalAction if f.default is True else "store_true"
            flag(parser, group, name, dest=f.name, default=UNSET, action=action, help=help_text)
        else:
            flag(parser, group, name, dest=f.name, default=UNSET, type=typ, choices=f.metadata.get("choices"),
                 kind=typ, help=help_text, metavar=None if f.metadata.get("choices") else name[2:].split("-")[-1].upper())


def sections(parser: Parser, *classes) -> None:
    """The command reads the tables of these configs from a ``--config`` file (``[train]`` for ``TrainConfig``)."""
    for cls in classes:
        parser.sections[cls.section] = cls


def config_values(cls, values: dict) -> dict:
    """The settings of ``cls`` the run gave: its ``--config`` table, then the flags and top-level TOML keys that were set."""
    names = {f.name for f in fields(cls)}
    given = {k: v for k, v in values.items() if k in names and v is not UNSET}
    return {**(values.get("sections") or {}).get(cls.section, {}), **given}


def config_from(cls, values: dict, base: dict | None = None):
    """``cls(**...)`` from the run's values over ``base`` (a preset): fields nobody set keep the dataclass default."""
    return cls(**{**(base or {}), **config_values(cls, values)})


def parse(parser: Parser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; an unknown flag is a one-line error naming the closest real flag, before anything else."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if a in parser.subparsers), None)
    if command is not None:
        sub = parser.subparsers[command]
        for word in argv[argv.index(command) + 1:]:
            if word == "--":
                break
            name = word.split("=", 1)[0]
            if name.startswith("-") and not _is_number(name) and name not in sub.option_strings:
                close = difflib.get_close_matches(name, sub.option_strings, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]}?" if close else f". See `celebbasis {command} --help`."
                print(f"{sub.prog}: error: unknown {name}{hint}", file=sys.stderr)  # one line, no usage block
                sys.exit(2)
    return parser.parse_args(argv)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def merged(parser: Parser, args: argparse.Namespace) -> argparse.Namespace:
    """The run's values: the command's flag defaults, then its ``--config`` TOML file, then the command line."""
    sub = parser.subparsers[args.command]
    given = vars(args)
    values = {**sub.flag_defaults, "sections": {}}
    if given.get("config"):
        values.update(read_toml(Path(given["config"]), sub, args.command))
    values.update(given)
    missing = [name for dest, name in sub.flag_required.items() if values.get(dest) in (None, [])]
    if missing:
        sub.error(f"the following arguments are required: {', '.join(missing)} (on the command line or in --config)")
    return argparse.Namespace(**values)


def read_toml(path: Path, sub: Parser, command: str) -> dict:
    """A TOML file's values by flag destination, its tables under ``sections``; unknown keys and wrong types are one-line errors.

    Settings of the configs (top-level keys that are their fields, and tables) are read by
    ``celebbasis.config.settings_from``, the reading ``TrainConfig.from_toml`` does.
    """
    data = load_toml(path)
    fields_of = {f.name: cls for cls in sub.flag_configs for f in fields(cls) if f.name in sub.flag_defaults}
    out: dict = {}
    tables = {}
    for key, value in data.items():
        name = RENAMED.get(key, key)
        if isinstance(value, dict):
            tables[key] = value
        elif name in out:
            raise InputError(f"{path}: {name} is given twice ({key} is its old name). Keep one.")
        elif name in fields_of:
            out.update(settings_from(fields_of[name], {key: value}, str(path)))
        else:
            out[sub.flag_names.get(key, key)] = _flag_value(path, sub, command, key, value)
    out["sections"] = _tables(path, sub, tables)
    for name, cls in sub.sections.items():
        twice = sorted(set(out["sections"].get(name, {})) & set(out)) if cls in sub.flag_configs else []
        if twice:
            raise InputError(f"{path}: {twice[0]} is given both at the top and in [{name}]. Keep one.")
    return out


def _tables(path: Path, sub: Parser, tables: dict) -> dict:
    """The file's config tables, checked; tables of configs this command does not take are checked and left aside."""
    known = {cls.section: cls for cls in CONFIGS}
    out = {}
    for name, table in tables.items():
        if name not in known:
            raise InputError(f"{path}: [{name}] is not a table celebbasis reads. Tables: "
                             f"{', '.join(f'[{s}]' for s in known)}.")
        values = settings_from(known[name], table, f"{path} [{name}]")
        if name in sub.sections:
            out[name] = values
    return out


def _flag_value(path: Path, sub: Parser, command: str, key: str, value):
    """A top-level TOML value of a flag that is not a config field, checked against the flag's type."""
    dest = sub.flag_names.get(key)
    if dest is None or dest == "config":
        valid = sorted({k for k in sub.flag_names if "_" not in k} - {"config", "help"})
        close = difflib.get_close_matches(key, valid, n=1)
        tables = [f"[{name}]" for name, cls in sub.sections.items()
                  if cls not in sub.flag_configs and key in {f.name for f in fields(cls)}]
        where = f"; as a setting it goes in a table: {' or '.join(tables)}" if tables else ""
        raise InputError(f"{path}: {key} is not a flag of `celebbasis {command}`"
                         f"{f' (did you mean {close[0]}?)' if close else ''}{where}. Valid keys: {', '.join(valid)}.")
    want = sub.flag_types[dest]
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if want is list and isinstance(value, str):
        value, ok = [value], True
    if not ok:
        raise InputError(f"{path}: {key} = {value!r} should be {getattr(want, '__name__', want)}. Fix the file.")
    return value
