"""Every command and subcommand answers --help; -o is --out; a missing optional dependency is reported."""

from __future__ import annotations

import argparse

import pytest

from cheers import cli


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _commands(sub, (*prefix, name))
    return out


COMMANDS = _commands(cli.build_parser())


def test_the_command_tree_is_complete():
    top = {c[0] for c in COMMANDS if len(c) == 1}
    assert {
        "generate",
        "edit",
        "ask",
        "chat",
        "info",
        "bench",
        "shapes",
        "train",
        "web",
        "eval",
        "plot",
        "ablate",
        "serve",
    } <= top
    assert ("eval", "shapes") in COMMANDS and ("eval", "ladder") in COMMANDS


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "cheers")
def test_every_command_answers_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_every_output_path_option_has_the_short_form():
    parser = cli.build_parser()
    found = []

    def walk(p: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        for action in p._actions:
            if "--out" in action.option_strings:
                found.append(path)
                assert "-o" in action.option_strings, path
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, (*path, name))

    walk(parser, ())
    assert ("generate",) in found and ("eval", "shapes") in found


def test_a_missing_optional_dependency_is_an_error_that_names_the_fix(monkeypatch, capsys):
    monkeypatch.setattr(
        cli,
        "OPTIONAL_COMMANDS",
        (*cli.OPTIONAL_COMMANDS, ("fancy", "cheers_test_absent_package.cli", "add", "demo")),
    )
    assert cli.main(["fancy", "--anything"]) == 2
    err = capsys.readouterr().err
    assert "cheers_test_absent_package" in err and "pip install 'cheers[demo]'" in err


def test_a_broken_module_of_our_own_is_not_hidden(monkeypatch):
    monkeypatch.setattr(cli, "OPTIONAL_COMMANDS", (("gone", "cheers.no_such_module", "add", None),))
    with pytest.raises(ModuleNotFoundError, match="cheers.no_such_module"):
        cli.build_parser()


@pytest.mark.filterwarnings("error::FutureWarning", "error::DeprecationWarning")
def test_generate_and_ask_print_no_deprecation_warning(tmp_path, capsys):
    """The README's commands on the bundled model: no FutureWarning / DeprecationWarning (e.g. the KV-cache
    argument transformers renamed) reaches the user."""
    out = tmp_path / "x.png"
    assert cli.main(["generate", "a red circle", "-o", str(out), "--steps", "2"]) == 0
    assert out.is_file()
    assert cli.main(["ask", str(out), "How many circles are there?", "--max-new-tokens", "4"]) == 0
