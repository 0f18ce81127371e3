"""Every command's --help as a newcomer reads it: each option explained, the values of a
choice listed, a default shown at most once and never empty."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator

import pytest

from moriio_proxy.cli import build_parser
from moriio_proxy.config import OPTIONS, Option, load_config

CONFIG_CHOICES = {o.name: o.choices for o in OPTIONS if o.choices}


def _subcommands() -> argparse._SubParsersAction[argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub


COMMANDS = dict(_subcommands().choices)


def _options(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str, argparse.Action]]:
    """(name, the text --help prints for it, the action) of every argument but --help."""
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        invocation = formatter._format_action_invocation(action)
        text = formatter._expand_help(action) if action.help else ""
        yield name, f"{invocation}  {text}", action


def test_the_commands_are_found():
    assert {"serve", "sim", "demo", "check", "admin"} <= set(COMMANDS)


def test_every_command_has_a_summary_and_a_description():
    summaries = {a.dest: a.help for a in _subcommands()._choices_actions}
    for name, parser in COMMANDS.items():
        assert summaries.get(name), f"{name} has no line in 'moriio-proxy --help'"
        assert parser.description, f"'moriio-proxy {name} --help' has no description"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help(command: str):
    for name, _, action in _options(COMMANDS[command]):
        assert action.help and action.help.strip(), f"{command} {name} has no help"


def _nested(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """The actions of a command that has its own (``admin URL ACTION``), by name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def test_the_actions_of_a_command_have_a_summary_and_explained_options():
    nested = [(c, n, p) for c, parser in COMMANDS.items() for n, p in _nested(parser)]
    assert {n for c, n, _ in nested if c == "admin"} >= {"list", "drain", "eject", "add"}
    for command, name, parser in nested:
        (sub,) = [
            a for a in COMMANDS[command]._actions if isinstance(a, argparse._SubParsersAction)
        ]
        summaries = {a.dest: a.help for a in sub._choices_actions}
        assert summaries.get(name), f"'{command} {name}' has no line in its command's help"
        for option, shown, action in _options(parser):
            assert action.help and action.help.strip(), f"{command} {name} {option} has no help"
            for choice in action.choices or ():
                assert str(choice) in shown, f"{command} {name} {option} hides {choice!r}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_values_of_a_choice_are_listed(command: str):
    for name, shown, action in _options(COMMANDS[command]):
        choices = action.choices or CONFIG_CHOICES.get(action.dest) or ()
        for choice in choices:
            assert str(choice) in shown, f"{command} {name} does not list {choice!r}: {shown}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_default_is_shown_once_and_says_something(command: str):
    for name, shown, _ in _options(COMMANDS[command]):
        assert shown.count("(default") <= 1, f"{command} {name}: {shown}"
        assert not re.search(r"\(default:?\s*\)", shown), f"{command} {name}: {shown}"
        for useless in ("(default: None)", "(default: False)", "(default: ())"):
            assert useless not in shown, f"{command} {name}: {shown}"


def test_every_serve_setting_has_its_flag_variable_and_default_in_the_help():
    serve = {action.dest: shown for _, shown, action in _options(COMMANDS["serve"])}
    for option in OPTIONS:
        shown = serve[option.name]
        assert option.flag in shown
        assert f"[env {option.env}]" in shown
        assert "(default: " in shown, f"{option.flag}: {shown}"


def test_a_setting_whose_default_would_show_empty_must_say_it_in_words():
    with pytest.raises(ValueError, match="--k8s-thing"):
        Option("k8s_thing", str, "a thing").help_line("")
    assert (
        Option("k8s_thing", str, "a thing", default_text="the pod's")
        .help_line("")
        .endswith("(default: the pod's)")
    )


def test_numbers_are_shown_as_typed():
    assert Option("x", float, "seconds").help_line(300.0).endswith("(default: 300)")
    assert Option("x", float, "seconds").help_line(0.05).endswith("(default: 0.05)")


def test_choices_are_taken_in_any_case_and_normalised():
    """--transfer-mode read is READ, as the help says ("any case")."""
    args = build_parser().parse_args(
        ["serve", "--transfer-mode", "read", "--log-level", "WARNING", "--discovery", "ZMQ"]
    )
    config = load_config({o.name: getattr(args, o.name) for o in OPTIONS}, env={})
    assert (config.transfer_mode, config.log_level, config.discovery) == ("READ", "warning", "zmq")
    sim = build_parser().parse_args(["sim", "--role", "p", "--mode", "write"])
    assert (sim.role, sim.mode) == ("P", "WRITE")
    demo = build_parser().parse_args(["demo", "--mode", "write"])
    assert demo.mode == "WRITE"


def test_a_choice_outside_the_list_is_refused_with_the_list():
    args = build_parser().parse_args(["serve", "--transfer-mode", "reed"])
    with pytest.raises(ValueError, match=r"--transfer-mode: must be one of auto, READ, WRITE"):
        load_config({o.name: getattr(args, o.name) for o in OPTIONS}, env={})
