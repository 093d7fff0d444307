"""The project's shared vocabulary: policy, dispatch-mode, token-placement and planner names.

A light module (no torch, no numpy) so that the ``grace`` command can list choices in its
help without importing the heavy modules that implement them. The modules that implement the
names import them from here: :mod:`megatron_grace.routing.policies` (``POLICY_NAMES``),
:mod:`megatron_grace.simulation.policies` (``DEFAULT_POLICY``),
:mod:`megatron_grace.simulation.simulator` (dispatch modes, token placements) and
:mod:`megatron_grace.simulation.compare` (``DEFAULT_PLANNERS``).
"""

#: Replica-choice policies of the routing module (and of the simulator, which runs them).
POLICY_NAMES: tuple[str, ...] = ("primary", "random", "position", "static-local", "grace")
#: The policy every command and function uses unless told otherwise.
DEFAULT_POLICY = "grace"
#: Dispatch modes of the layer and the simulator.
DISPATCH_MODES: tuple[str, ...] = ("flat", "hierarchical")
#: Deprecated dispatch-mode names and the mode they mean.
DISPATCH_ALIASES: dict[str, str] = {"per-pair": "flat"}
#: How the simulator puts tokens on GPUs.
TOKEN_PLACEMENTS: tuple[str, ...] = ("round-robin", "request")
#: Planners that ``compare_planners`` (and ``grace compare``) run by default.
DEFAULT_PLANNERS: tuple[str, ...] = ("vanilla", "eplb", "affinity", "grace")
