"""Range checks of parsed command-line numbers, in one place for every command.

argparse turns ``--tokens 1000000000000`` or ``--seed 2**70`` into Python integers of any size
and ``--ratio nan`` into a float NaN; :func:`check_numbers` refuses them before a command runs,
so no command allocates from, overflows on or silently computes with an absurd flag value.
:func:`check_outputs` refuses output paths that can never be written before the work starts.
The checks go by the argument's ``dest``, so they apply to every command that has the flag.
"""

from __future__ import annotations

import argparse
import math
import os

from megatron_grace import limits
from megatron_grace.errors import GraceInputError

INT64_MAX = 2**63 - 1

# dest -> (lowest value, name of the limits.Limits ceiling or None for 2**63 - 1)
_INT_RANGES: dict[str, tuple[int, str | None]] = {
    "tokens": (1, "tokens"),
    "seed": (0, None),
    "knob_seed": (0, None),
    "slots": (1, "slots"),
    "extra_slots": (0, "slots"),
    "num_experts": (1, "experts"),
    "top_k": (1, "top_k"),
    "knob_num_groups": (1, "experts"),
}


# output paths (files or folders), checked before a command spends time on its work
_OUTPUT_DESTS = ("out", "json", "plot", "export_eplb", "export_sglang", "dump_decisions")


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse output paths that can never be written (name too long, a FIFO or device) up front."""
    from megatron_grace._files import check_output_path

    for dest in _OUTPUT_DESTS:
        value = getattr(args, dest, None)
        if isinstance(value, str | os.PathLike):
            check_output_path(value, folder_ok=True)


def _flag(dest: str) -> str:
    return "--" + dest.removeprefix("knob_").replace("_", "-")


def check_numbers(args: argparse.Namespace) -> None:
    """Refuse out-of-range numbers in ``args``: ints beyond int64 or their flag's range, non-finite floats.

    Raises:
        GraceInputError: one line naming the flag, its value and the allowed range.
    """
    for dest, value in vars(args).items():
        if isinstance(value, bool) or value is None:
            continue
        flag = _flag(dest)
        if isinstance(value, float) and not math.isfinite(value):
            raise GraceInputError(f"{flag} must be a finite number, got {value}")
        if not isinstance(value, int):
            continue
        low, ceiling = _INT_RANGES.get(dest, (-INT64_MAX, None))
        if value < low:
            raise GraceInputError(f"{flag} must be >= {low}, got {value}")
        if ceiling is not None:
            limits.check_count(ceiling, value, f"{flag} {value}")
        elif value > INT64_MAX:
            raise GraceInputError(f"{flag} must be below 2**63, got {value}")
