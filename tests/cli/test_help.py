"""What a newcomer meets first: `lorakit`, `lorakit --version`, and every sub-command's `--help`
(no traceback, every option with its default), and $LORAKIT_MODEL standing in for --model."""

import argparse
import pytest

import lorakit
from lorakit.cli import build_parser, env_name, main

COMMANDS = sorted(next(a for a in build_parser({})._actions
                       if isinstance(a, argparse._SubParsersAction)).choices)


def test_every_command_is_listed():
    assert {"train", "eval", "generate", "merge", "compare", "serve", "plan", "inspect",
            "diagnose"} <= set(COMMANDS)


def test_bare_lorakit_shows_the_commands_and_the_first_two_steps(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert "first steps:" in out and "lorakit train " in out and "lorakit diagnose runs/<run>" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"lorakit {lorakit.__version__}"


def _subparser(name, environ=None):
    parser = build_parser(environ or {})
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_runs_and_states_every_default(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: lorakit {command}")
    sub = _subparser(command)
    for action in sub._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        own = sub._get_formatter()._format_action(action)  # the option's lines in --help
        assert action.option_strings[-1] in out
        if action.default is not None:
            assert "default" in own, (command, action.option_strings, own)


def test_train_help_states_the_config_defaults_and_a_percent_sign(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "82.5% held-out exact match" in text  # a field's docstring with a % in it
    assert "--lr LEARNING_RATE (default: 0.0002)" in text
    assert "--model MODEL An embedded model name" in text and "(default: smollm2-135m)" in text
    assert "--use-dora, --no-use-dora DoRA" in text and "(default: off)" in text


def test_an_environment_variable_sets_an_option_a_flag_overrides(capsys):
    env = {"LORAKIT_MODEL": "/models/tiny", "LORAKIT_MAX_STEPS": "3", "LORAKIT_LR": "1e-3",
           "LORAKIT_EXAMPLES": "4"}
    for command in ("train", "generate", "serve", "plan", "eval", "merge", "compare"):
        assert _subparser(command, env).get_default("model") == "/models/tiny", command
    args = build_parser(env).parse_args(["train"])
    assert (args.model, args.max_steps, args.learning_rate) == ("/models/tiny", 3, 1e-3)  # typed
    args = build_parser(env).parse_args(["train", "--model", "other", "--max-steps", "7"])
    assert (args.model, args.max_steps) == ("other", 7)  # a flag wins
    assert build_parser(env).parse_args(["eval", "--adapter", "a"]).examples == 4
    args = build_parser({}).parse_args(["train"])
    assert args.model is None and args.max_steps is None  # TrainConfig's (or --config's) apply
    with pytest.raises(SystemExit):
        build_parser(env | {"LORAKIT_MODEL": "a 100% path"}).parse_args(["train", "--help"])
    assert "(default: $LORAKIT_MAX_STEPS, 3)" in " ".join(capsys.readouterr().out.split())


def test_only_options_that_take_one_value_have_a_variable():
    train = _subparser("train")
    names = {env_name(a) for a in train._actions}
    assert {"LORAKIT_MODEL", "LORAKIT_MAX_STEPS", "LORAKIT_LR", "LORAKIT_CONFIG"} <= names
    assert "LORAKIT_USE_DORA" not in names and "LORAKIT_TARGET_MODULES" not in names
