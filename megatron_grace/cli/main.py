"""Entry point of the ``grace`` command.

Each command group lives in its own module exposing ``register(subparsers)``, which adds
its sub-commands; each sub-command sets ``func(args) -> int``. Bad input
(:class:`GraceInputError`, out-of-range flags, OS errors such as a permission denied or a
name too long, input too large or too deep) is reported as one line on stderr with exit code
2; a closed output pipe (``grace stats | head -1``) ends quietly with 141 like Unix tools;
:class:`GraceInputWarning` prints one ``warning:`` line, a :class:`ContradictionWarning` is an
error. ``--limit NAME=VALUE`` raises a ceiling of :mod:`megatron_grace.limits`.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from megatron_grace import __version__
from megatron_grace.errors import ContradictionWarning, GraceInputError, GraceInputWarning

COMMAND_MODULES = (
    "megatron_grace.cli.cmd_data",
    "megatron_grace.cli.cmd_plan",
    "megatron_grace.cli.cmd_simulate",
    "megatron_grace.cli.cmd_demo",
    "megatron_grace.cli.cmd_checkpoint",
)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``grace`` parser; ``command`` (the sub-command about to run) is registered in full.

    A command module may list its sub-commands with their one-line help in a module-level
    ``COMMANDS`` dict; its ``register`` (which may import heavy modules for choices and help)
    then runs only when one of them is ``command`` or ``command`` is None, and the others get a
    stub entry for ``grace --help``. That keeps ``grace --help``, ``--version`` and the commands
    that need no torch fast. Modules without ``COMMANDS`` are always registered in full.
    """
    import importlib

    parser = argparse.ArgumentParser(
        prog="grace",
        description="GRACE-MoE for expert-parallel MoE inference: routing statistics, expert placement, "
        "replication and locality-aware routing. Run 'grace COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"megatron-grace {__version__}")
    parser.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                        help="raise a ceiling on input sizes (repeatable): experts, layers, top_k, tokens, slots, gpus, "
                        "memory_gb, zip_ratio; see the README's Limits")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # command group not present in this build
                continue
            raise
        commands: dict[str, str] | None = getattr(module, "COMMANDS", None)
        if commands is None or command is None or command in commands:
            module.register(subparsers)
        else:
            for sub, text in commands.items():
                subparsers.add_parser(sub, help=text)
    return parser


def _command_of(argv: Sequence[str]) -> str:
    """The sub-command named in ``argv`` (its first non-option word, skipping ``--limit``'s value), or ``""``."""
    words = iter(argv)
    for a in words:
        if a == "--limit":
            next(words, None)
        elif not a.startswith("-"):
            return a
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``grace``; returns the exit code (0 ok, 2 bad input or usage)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from megatron_grace import limits
    from megatron_grace.cli._args import check_numbers, check_outputs

    def error(text: str) -> int:
        print(f"grace {args.command}: error: {text}", file=sys.stderr)
        return 2

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001 - warnings API
        if issubclass(category, GraceInputWarning):
            print(f"grace {args.command}: warning: {message}", file=sys.stderr)
        else:
            default_show(message, category, filename, lineno, file, line)

    default_show = warnings.showwarning
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            warnings.simplefilter("error", ContradictionWarning)  # contradicting inputs: refused, not warned
            limits.set_limits(**limits.parse_limits(args.limit))
            check_numbers(args)
            check_outputs(args)
            code = int(args.func(args) or 0)
            sys.stdout.flush()  # a closed pipe shows here, inside the handlers below, not at exit
            return code
    except (GraceInputError, ContradictionWarning) as exc:
        return error(str(exc))
    except BrokenPipeError:  # the reader went away (| head): stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except OSError as exc:  # permission denied, name too long, read-only, exists, no space, ...
        where = f"{exc.filename}: " if exc.filename else ""
        return error(f"{where}{exc.strerror or exc}")
    except MemoryError:
        return error("out of memory: the input or the flags ask for more than this machine holds (see `grace --limit`)")
    except RecursionError:
        return error("input nested too deeply")
    except KeyboardInterrupt:
        print(f"grace {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
