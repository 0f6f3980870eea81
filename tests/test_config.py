"""The config dataclasses: one name per setting, dicts and TOML files in and out."""

from __future__ import annotations

import json
import logging
from dataclasses import fields
from pathlib import Path

import pytest

from celebbasis.config import BasisConfig, GenerateConfig, TrainConfig
from celebbasis.errors import InputError

CONFIGS = (BasisConfig, TrainConfig, GenerateConfig)
SHIPPED = Path(__file__).parent.parent / "configs"
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
            flag = "--" + f.name.replace("_", "-")
            off = ["--no-" + flag[2:]] if f.default is True else []  # a setting on by default is turned off so
            assert actions[f.name].option_strings == [flag, *off], (command, f.name)
            assert set(f.metadata) <= {"help", "choices"}, f"{cls.__name__}.{f.name}: no other name than its own"


def toml_text(settings: dict, table: str | None = None) -> str:
    """A TOML file of plain values (what ``to_dict`` gives): JSON spells str, int, float and bool as TOML does."""
    lines = [f"[{table}]"] if table else []
    return "\n".join(lines + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]) + "\n"


CHANGED = {  # a config of each kind with every kind of value away from its default
    BasisConfig: BasisConfig(n_components=7, n_tokens=3, dedupe=True),
    TrainConfig: TrainConfig(steps=5, learning_rate=0.5, resolution=64, views=0, face_per_photo=True, hue=0.0),
    GenerateConfig: GenerateConfig(negative_prompt='blurry "old"', height=64, width=128, scheduler="euler_a", guidance=3.0),
}


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_to_dict_round_trips_through_json_and_toml(cls, tmp_path):
    for config in (cls(), CHANGED[cls]):
        data = config.to_dict()
        assert all(type(v) in (int, float, bool, str) for v in data.values()), data  # plain values only, no None
        assert cls.from_dict(json.loads(json.dumps(data))) == config
        flat, tables = tmp_path / "flat.toml", tmp_path / "tables.toml"
        flat.write_text(toml_text(data))
        other = "generate" if cls is not GenerateConfig else "train"
        tables.write_text('model = "elsewhere"\n' + toml_text(data, cls.section) + toml_text({"seed": 9}, other))
        assert cls.from_toml(flat) == config  # a file of this config's settings alone
        assert cls.from_toml(tables) == config  # its own table of a run file; the rest is for others


def test_to_dict_leaves_out_only_settings_that_default_to_none():
    for cls in CONFIGS:
        for f in fields(cls):
            if f.name not in cls().to_dict():
                assert f.default is None, f"{cls.__name__}.{f.name}: left out of to_dict, so it must default to None"


@pytest.mark.parametrize("content, match", [
    ("stepz = 3", "t.toml: stepz is not a setting of TrainConfig (did you mean steps?)"),
    ("[train]\nmodel = 'x'", "t.toml [train]: model is not a setting of TrainConfig"),
    ("steps = 'many'", "t.toml: steps = 'many' should be int"),
    ("steps = ", "t.toml is not valid TOML"),
    (None, "t.toml: no such config file"),
])
def test_bad_files_are_one_line_errors_naming_file_and_key(tmp_path, content, match):
    path = tmp_path / "t.toml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError) as e:
        TrainConfig.from_toml(path)
    assert match in str(e.value) and "\n" not in str(e.value)


def test_values_are_checked_when_read(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text("steps = -1\n")
    with pytest.raises(InputError, match="steps must be >= 0"):
        TrainConfig.from_toml(path)
    path.write_text("learning_rate = 1\nresolution = 64\n")  # an int where a float goes is that float
    assert TrainConfig.from_toml(path).learning_rate == 1.0


def test_the_old_name_of_views_is_read_with_a_warning(tmp_path, caplog):
    path = tmp_path / "old.toml"
    path.write_text("views_per_identity = 3\n")
    with caplog.at_level(logging.WARNING, logger="celebbasis.config"):
        assert TrainConfig.from_toml(path).views == 3
    assert "views_per_identity is now called views" in caplog.text and str(path) in caplog.text
    path.write_text("views_per_identity = 3\nviews = 4\n")
    with pytest.raises(InputError, match="views is given twice"):
        TrainConfig.from_toml(path)


def test_shipped_run_files_give_the_cli_and_python_the_same_settings():
    from celebbasis.cli import _generate_config, _train_config, build_parser
    from celebbasis.cli_flags import merged, parse

    parser = build_parser()
    for path in sorted(SHIPPED.glob("*.toml")):
        args = merged(parser, parse(parser, ["add", "x.jpg", "--name", "x", "--config", str(path)]))
        assert _train_config(args) == TrainConfig.from_toml(path), path
        args = merged(parser, parse(parser, ["generate", "p", "--config", str(path)]))
        assert _generate_config(args) == GenerateConfig.from_toml(path), path
    assert TrainConfig.from_toml(SHIPPED / "tiny.toml").steps == 20 and GenerateConfig.from_toml(SHIPPED / "tiny.toml").steps == 20


def test_cli_reads_settings_with_the_library(tmp_path, capsys, astronaut_path):
    """The CLI's --config goes through ``settings_from``: the same errors, the same old names."""
    from celebbasis.cli import _train_config, build_parser, main
    from celebbasis.cli_flags import merged, parse

    cfg = tmp_path / "run.toml"
    cfg.write_text("[train]\nstepz = 3\n")
    assert main(["add", str(astronaut_path), "--name", "x", "--config", str(cfg), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{cfg} [train]: stepz is not a setting of TrainConfig (did you mean steps?)" in err[0]

    parser = build_parser()
    cfg.write_text("views_per_identity = 5\n[train]\nseed = 3\nsteps = 4\n")  # 0.1's name at the top, settings in [train]
    args = merged(parser, parse(parser, ["add", "x.jpg", "--name", "x", "--config", str(cfg), "--steps", "2"]))
    assert (_train_config(args).views, _train_config(args).seed, _train_config(args).steps) == (5, 3, 2)  # flags win
    cfg.write_text("views_per_identity = 5\nviews = 4\n")
    with pytest.raises(InputError, match="views is given twice"):
        merged(parser, parse(parser, ["add", "x.jpg", "--name", "x", "--config", str(cfg)]))
    cfg.write_text("seed = 1\n[train]\nseed = 3\n")
    with pytest.raises(InputError, match="seed is given both at the top and in \\[train\\]"):
        merged(parser, parse(parser, ["add", "x.jpg", "--name", "x", "--config", str(cfg)]))
    cfg.write_text("[trian]\nseed = 3\n")
    with pytest.raises(InputError, match="\\[trian\\] is not a table celebbasis reads"):
        merged(parser, parse(parser, ["add", "x.jpg", "--name", "x", "--config", str(cfg)]))


def test_a_setting_on_by_default_is_turned_off_on_the_command_line():
    from celebbasis.cli import build_parser
    from celebbasis.cli_flags import config_from, parse

    values = lambda *flags: vars(parse(build_parser(), ["add", "a.jpg", "--name", "x", *flags]))  # noqa: E731
    assert config_from(TrainConfig, values()).scale_lr is True
    assert config_from(TrainConfig, values("--no-scale-lr")).scale_lr is False
    assert config_from(TrainConfig, values("--no-scale-lr", "--batch-size", "4")).optimizer_lr == TrainConfig.learning_rate
