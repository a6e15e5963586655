"""Command-line parsing shared by the scripts: a usage error is one line naming the closest flag (argparse's own is
the whole usage block, and `run_hybrid_clip.py` has over a hundred flags), flags are never abbreviated (a typo such
as `--learning_rat` must not silently become `--learning_rate`), `--flag_name` and `--flag-name` are the same flag,
and numeric flags are range-checked where they are parsed, with the flag's name."""

from __future__ import annotations

import argparse
import difflib
import math
import re
import sys
from typing import Callable, NoReturn

USAGE_EXIT = 2


def closest_flag(given: str, known: list[str]) -> str | None:
    """The known option string nearest to `given` (spelling-insensitive to - and _), if any is close."""
    name = given.split("=", 1)[0]
    canon: dict[str, str] = {}
    for k in known:  # the underscore spelling is the documented one
        key = k.replace("-", "_")
        if key not in canon or canon[key][2:].count("-") > k[2:].count("-"):
            canon[key] = k
    match = difflib.get_close_matches(name.replace("-", "_"), list(canon), n=1, cutoff=0.6)
    return canon[match[0]] if match else None


def unknown_flags_message(unknown: list[str], known: list[str]) -> str:
    flags = [u for u in unknown if u.startswith("-")]
    if not flags:
        return f"unexpected argument(s): {' '.join(unknown)}"
    first = flags[0].split("=", 1)[0]
    suggestion = closest_flag(first, known)
    more = f" (and {len(flags) - 1} more: {' '.join(f.split('=', 1)[0] for f in flags[1:])})" if len(flags) > 1 else ""
    return f"unknown flag {first}{more}" + (f"; did you mean {suggestion}?" if suggestion else "; see --help")


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """The parser's --flags, and its subcommands' (a subcommand's unknown flags are reported by the top parser)."""
    known = []
    for action in parser._actions:
        known += [s for s in action.option_strings if s.startswith("--")]
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                known += option_strings(sub)
    return known


def normalise_spellings(argv: list[str], known: list[str]) -> list[str]:
    """`--flag_name` where the parser knows `--flag-name` (or the reverse) rewritten to the known spelling."""
    known_set = set(known)
    out = []
    for arg in argv:
        if arg == "--":
            out += argv[len(out):]
            break
        if arg.startswith("--"):
            name, sep, value = arg.partition("=")
            if name not in known_set:
                for other in (name[:2] + name[2:].replace("_", "-"), name[:2] + name[2:].replace("-", "_")):
                    if other in known_set:
                        arg = other + sep + value
                        break
        out.append(arg)
    return out


class OneLineErrors:
    """Mixin for argparse parsers: errors are one line on stderr and exit 2, with the closest flag for a typo."""

    def error(self, message: str) -> NoReturn:  # argparse's hook
        if message.startswith("unrecognized arguments: "):
            message = unknown_flags_message(message.removeprefix("unrecognized arguments: ").split(),
                                            option_strings(self))
        choice = re.match(r"argument (\S+): invalid choice: '(.*)' \(choose from (.*)\)$", message)
        if choice:
            options = [c.strip(" '") for c in choice.group(3).split(",")]
            close = difflib.get_close_matches(choice.group(2), options, n=1, cutoff=0.6)
            message = (f"{choice.group(1)} {choice.group(2)!r} is unknown; "
                       + (f"did you mean {close[0]!r}? " if close else "") + f"choose from {', '.join(options)}")
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(USAGE_EXIT)


class ArgumentParser(OneLineErrors, argparse.ArgumentParser):
    """argparse without abbreviations, with one-line errors and both spellings of every --flag_name."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(normalise_spellings(args, option_strings(self)), namespace)



def number_in_range(kind: type, low: float | None = None, high: float | None = None, *, low_open: bool = False,
                    high_open: bool = False) -> Callable[[str], int | float]:
    """An argparse `type=` that parses `kind` and refuses values outside [low, high] (open ends as asked)."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        problem = range_problem(value, low, high, low_open=low_open, high_open=high_open)
        if problem:
            raise argparse.ArgumentTypeError(f"{text}: {problem}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def range_problem(value: float, low: float | None, high: float | None, *, low_open: bool = False,
                  high_open: bool = False) -> str | None:
    """What is wrong with `value` for the range, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not (too_low or too_high):
        return None
    if high is None:
        return f"must be {'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"must be {'<' if high_open else '<='} {high:g}"
    return f"must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
