"""Arguments and helpers shared by the ``grace`` commands (one definition of each flag).

Light at import time: the heavy modules are imported inside the functions that need them.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from megatron_grace.names import DEFAULT_POLICY, DISPATCH_ALIASES, DISPATCH_MODES, POLICY_NAMES

DEFAULT_TOPOLOGY = "a100-2x4"
DEFAULT_EXTRA_SLOTS = 1
BUNDLED = "bundled"

#: What "ms/layer" means wherever the CLI prints it.
MS_PER_LAYER = ("ms/layer: modelled time of one MoE layer (dispatch + expert compute on the busiest GPU + combine) "
                "with all measured tokens in one batch, mean over layers")
POLICY_HELP = (f"replica-choice policy: {DEFAULT_POLICY} (default: own GPU, else own node, else the remote copy with "
               "the most predicted spare capacity), " + ", ".join(p for p in POLICY_NAMES if p != DEFAULT_POLICY)
               + " (the routing module's policies, run as the distributed layer runs them)")


def add_topology_arguments(parser: argparse.ArgumentParser) -> None:
    """``--topology`` (NxG or a preset, default a100-2x4) and ``--links`` (link profile / overrides)."""
    from megatron_grace.plan.topology import LINKS_HELP, TOPOLOGY_HELP

    parser.add_argument("--topology", default=DEFAULT_TOPOLOGY, metavar="NxG|PRESET",
                        help=f"{TOPOLOGY_HELP}; default {DEFAULT_TOPOLOGY}")
    parser.add_argument("--links", default=None, metavar="PROFILE[,KEY=VALUE...]", help=LINKS_HELP)


def topology_from_args(args: argparse.Namespace):
    """The :class:`~megatron_grace.plan.topology.Topology` of ``--topology`` and ``--links`` (no budget yet)."""
    from megatron_grace.plan.topology import Topology

    return Topology.parse(args.topology, args.links)


def add_extra_slots_argument(parser: argparse.ArgumentParser | Any, **kwargs: Any) -> None:
    """``--extra-slots N``: slots per GPU above an even split of the experts (default 1)."""
    parser.add_argument("--extra-slots", type=int, help=f"expert slots per GPU above an even split of the experts "
                        f"(the replication budget; default {DEFAULT_EXTRA_SLOTS})", **kwargs)


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """``--model NAME``: the model name to record (or use) for the input data."""
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="model name of the input data (e.g. mixtral-8x7b, Qwen/Qwen3-30B-A3B), replacing what the "
                        "source records (JSONL dumps record 'unknown'); the model shape for bytes and FLOPs is found from it")


def add_dispatch_argument(parser: argparse.ArgumentParser) -> None:
    """``--dispatch flat|hierarchical|both``."""
    parser.add_argument("--dispatch", choices=(*DISPATCH_MODES, "both", *DISPATCH_ALIASES),
                        metavar="{" + ",".join((*DISPATCH_MODES, "both")) + "}", default="both",
                        help="dispatch mode(s): flat (one copy of the token per token-expert pair on another GPU, as "
                        "Megatron-Core's alltoall dispatcher and DeepSpeed send), hierarchical (one copy per token and "
                        "remote node, then forwarded inside the node) or both (default); per-pair is a deprecated name of flat")


def with_model(data, model: str | None):
    """``data`` (a RoutingTrace or ExpertStats) with its model name replaced by ``model`` when given."""
    if not model:
        return data
    return dataclasses.replace(data, model=model)


def model_shape_for(model_shape: str | None, model: str, what: str, data=None):
    """The model shape of ``--model-shape`` or of the data's model name, with an error that says how to fix it;
    checked against ``data``'s experts per layer and k when given (a contradiction is an error in the CLI)."""
    from megatron_grace.errors import GraceInputError
    from megatron_grace.plan.topology import MODEL_PRESETS
    from megatron_grace.simulation.simulator import resolve_model_shape

    try:
        return resolve_model_shape(model_shape, model, data)
    except GraceInputError:
        raise GraceInputError(
            f"cannot tell the model shape (sizes for bytes and FLOPs) from the {what}'s model name {model!r}: give "
            f"--model NAME (a name that contains one of {', '.join(sorted(MODEL_PRESETS))}) or --model-shape NAME, "
            "or record the name once with `grace import ... --model NAME`"
        ) from None


def note(text: str) -> None:
    """One ``note:`` line on stderr."""
    print(f"note: {text}", file=sys.stderr)


def warn(text: str) -> None:
    """A :class:`~megatron_grace.errors.GraceInputWarning`: the CLI prints it as its one ``warning:`` line."""
    import warnings

    from megatron_grace.errors import GraceInputWarning

    warnings.warn(text, GraceInputWarning, stacklevel=2)
