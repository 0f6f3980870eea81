"""The config dataclasses: one name per setting, dicts and TOML files in and out."""

from __future__ import annotations

from dataclasses import fields

import pytest

from celebbasis.config import BasisConfig, GenerateConfig, TrainConfig

CONFIGS = (BasisConfig, TrainConfig, GenerateConfig)
COMMANDS = {BasisConfig: ("build-basis",), TrainConfig: ("add", "add-many", "demo"), GenerateConfig: ("generate",)}


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_setting_has_one_name(cls):
    """A field's flag is its name with ``_`` -> ``-``, on every command that takes the config."""
    from celebbasis.cli import build_parser

    parser = build_parser()
    for command in COMMANDS[cls]:
        actions = {a.dest: a for a in parser.subparsers[command]._actions}
        for f in fields(cls):
            assert f.name in actions, f"{command}: {cls.__name__}.{f.name} has no flag"
            assert actions[f.name].option_strings == ["--" + f.name.replace("_", "-")], (command, f.name)
            assert set(f.metadata) <= {"help", "choices"}, f"{cls.__name__}.{f.name}: no other name than its own"
