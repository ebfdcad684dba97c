"""Shell completion for bash and zsh, generated from the argument parser (``trio-tunnel completion bash|zsh``).

Why generated scripts and not argcomplete: argcomplete runs the program on every TAB (importing Trio and
trio-tunnel takes a noticeable fraction of a second), needs a runtime dependency and a global activation step.
A script printed from the same parser the command uses is instant, needs nothing installed, and cannot drift from
the options: it is made from them each time it is printed (a test checks it in a real bash, and in zsh where
available).

What it completes: commands, each command's options, the values of options with fixed choices (``--log-format``,
the shell of ``completion``), and file names after options whose value is a file (metavar FILE/PATH) or directory
(DIR). Other values (addresses, tokens, specs) are the user's to type.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from typing import Final

import attrs

__all__ = ["SHELLS", "bash_script", "script", "zsh_script"]

SHELLS: Final = ("bash", "zsh")
_FILE_METAVARS: Final = frozenset({"FILE", "PATH"})
_DIR_METAVARS: Final = frozenset({"DIR"})


@attrs.frozen
class _Option:
    names: tuple[str, ...]
    help: str
    takes_value: bool
    repeatable: bool
    choices: tuple[str, ...]
    metavar: str


@attrs.frozen
class _Command:
    name: str
    help: str
    options: tuple[_Option, ...]
    positionals: tuple[str, ...]
    """Fixed choices of the positional arguments (``completion``'s shell), in order."""


def _options(parser: argparse.ArgumentParser) -> tuple[_Option, ...]:
    found = []
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        found.append(
            _Option(
                names=tuple(action.option_strings),
                help=_short(action.help or ""),
                takes_value=action.nargs != 0,
                repeatable=isinstance(action, argparse._AppendAction | argparse._CountAction),
                choices=tuple(str(choice) for choice in action.choices or ()),
                metavar=str(action.metavar or ""),
            )
        )
    return tuple(found)


def _short(text: str) -> str:
    """The first clause of a help text: what a completion menu has room for."""
    text = re.split(r"[;(]| e\.g\.", text.replace("%%", "%"), maxsplit=1)[0].strip().rstrip(",:")
    return text if len(text) <= 70 else text[:67].rstrip() + "..."


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    (action,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action


def _commands(parser: argparse.ArgumentParser) -> Iterator[_Command]:
    sub = _subparsers(parser)
    helps = {choice.dest: _short(choice.help or "") for choice in sub._choices_actions}
    for name, command in sub.choices.items():
        positionals = tuple(
            " ".join(str(c) for c in action.choices or ())
            for action in command._actions
            if not action.option_strings and not isinstance(action, argparse._SubParsersAction)
        )
        yield _Command(name, helps.get(name, ""), _options(command), positionals)


# --------------------------------------------------------------------------------------------------------------------
# bash


def _value_cases(options: list[_Option]) -> list[str]:
    """``case "$prev"`` branches: what follows an option that takes a value."""
    files = sorted({n for o in options if o.metavar in _FILE_METAVARS for n in o.names})
    dirs = sorted({n for o in options if o.metavar in _DIR_METAVARS for n in o.names})
    lines = []
    if files:
        lines.append(f'        {"|".join(files)}) COMPREPLY=($(compgen -f -- "$cur")); compopt -o filenames; return ;;')
    if dirs:
        lines.append(f'        {"|".join(dirs)}) COMPREPLY=($(compgen -d -- "$cur")); compopt -o filenames; return ;;')
    by_choices: dict[tuple[str, ...], set[str]] = {}
    for option in options:
        if option.choices:
            by_choices.setdefault(option.choices, set()).update(option.names)
    for choices, names in by_choices.items():
        lines.append(
            f'        {"|".join(sorted(names))}) COMPREPLY=($(compgen -W "{" ".join(choices)}" -- "$cur")); return ;;'
        )
    others = sorted({n for o in options if o.takes_value and not o.choices for n in o.names} - set(files) - set(dirs))
    if others:
        lines.append(f"        {'|'.join(others)}) return ;;  # a value to type")
    return lines


def _words(options: tuple[_Option, ...]) -> str:
    return " ".join(name for option in options for name in option.names)


def bash_script(parser: argparse.ArgumentParser) -> str:
    """A bash completion script (``source <(trio-tunnel completion bash)``)."""
    prog = parser.prog
    function = "_" + re.sub(r"\W", "_", prog)
    top = _options(parser)
    commands = list(_commands(parser))
    every = [*top, *(o for c in commands for o in c.options)]
    command_cases = []
    for command in commands:
        candidates = " ".join(filter(None, [_words(command.options), *command.positionals]))
        command_cases.append(f'        {command.name}) COMPREPLY=($(compgen -W "{candidates}" -- "$cur")) ;;')
    return "\n".join(
        [
            f"# bash completion for {prog}, generated by '{prog} completion bash'.",
            f"# Use: source <({prog} completion bash), or save it as",
            f"# /usr/share/bash-completion/completions/{prog} (or ~/.local/share/bash-completion/completions/{prog}).",
            f"{function}() {{",
            '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}" command="" i',
            "    for ((i = 1; i < COMP_CWORD; i++)); do",
            '        case "${COMP_WORDS[i]}" in',
            f'            {"|".join(c.name for c in commands)}) command="${{COMP_WORDS[i]}}"; break ;;',
            "        esac",
            "    done",
            '    case "$prev" in',
            *_value_cases(every),
            "    esac",
            '    case "$command" in',
            f'        "") COMPREPLY=($(compgen -W "{_words(top)} {" ".join(c.name for c in commands)}" -- "$cur")) ;;',
            *command_cases,
            "    esac",
            "}",
            f"complete -F {function} {prog}",
            "",
        ]
    )


# --------------------------------------------------------------------------------------------------------------------
# zsh


def _zsh_quote(text: str) -> str:
    """Text inside an ``_arguments`` spec in single quotes: brackets and colons escaped, quotes closed and reopened."""
    text = text.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]").replace(":", "\\:")
    return text.replace("'", "'\\''")


def _zsh_specs(options: tuple[_Option, ...]) -> list[str]:
    specs = []
    for option in options:
        action = ""
        if option.takes_value:
            if option.choices:
                action = f":{_zsh_quote(option.metavar or 'value')}:({' '.join(option.choices)})"
            elif option.metavar in _FILE_METAVARS:
                action = f":{_zsh_quote(option.metavar)}:_files"
            elif option.metavar in _DIR_METAVARS:
                action = f":{_zsh_quote(option.metavar)}:_files -/"
            else:
                action = f":{_zsh_quote(option.metavar or 'value')}: "
        star = "*" if option.repeatable else ""
        exclusive = f"({' '.join(option.names)})" if len(option.names) > 1 and not star else ""
        for name in option.names:
            specs.append(f"'{exclusive}{star}{name}[{_zsh_quote(option.help)}]{action}'")
    return specs


def zsh_script(parser: argparse.ArgumentParser) -> str:
    """A zsh completion script (``source <(trio-tunnel completion zsh)``, or a file ``_trio-tunnel`` in $fpath)."""
    prog = parser.prog
    function = "_" + re.sub(r"\W", "_", prog)
    commands = list(_commands(parser))
    lines = [
        f"#compdef {prog}",
        f"# zsh completion for {prog}, generated by '{prog} completion zsh'.",
        f"# Use: source <({prog} completion zsh) after compinit, or save it as _{prog} in a directory of $fpath.",
        f"{function}() {{",
        '    local curcontext="$curcontext" state line',
        "    typeset -A opt_args",
        "    _arguments -C \\",
        *(f"        {spec} \\" for spec in _zsh_specs(_options(parser))),
        "        '1:command:->command' \\",
        "        '*::argument:->argument'",
        "    case $state in",
        "        command)",
        "            local -a commands",
        "            commands=(",
        *(f"                '{c.name}:{_zsh_quote(c.help)}'" for c in commands),
        "            )",
        f"            _describe -t commands '{prog} command' commands ;;",
        "        argument)",
        "            case $words[1] in",
    ]
    for command in commands:
        positionals = [f"'{i}:{i}:({choices})'" for i, choices in enumerate(command.positionals, 1) if choices]
        specs = [*_zsh_specs(command.options), *positionals]
        lines.append(f"                {command.name})")
        lines.append("                    _arguments \\")
        lines.extend(f"                        {spec} \\" for spec in specs[:-1])
        lines.append(f"                        {specs[-1]} ;;")
    lines += [
        "            esac ;;",
        "    esac",
        "}",
        'if [[ "${zsh_eval_context[-1]}" == loadautofunc ]]; then',
        f'    {function} "$@"',
        "else",
        f"    compdef {function} {prog}",
        "fi",
        "",
    ]
    return "\n".join(lines)


def script(shell: str, parser: argparse.ArgumentParser) -> str:
    """The completion script for ``shell`` (one of :data:`SHELLS`)."""
    return bash_script(parser) if shell == "bash" else zsh_script(parser)
