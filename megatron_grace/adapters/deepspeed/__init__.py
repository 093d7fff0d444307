"""DeepSpeed-MoE with GRACE (inference): convert a model's ``deepspeed.moe.layer.MoE`` modules in place.

::

    import deepspeed
    from megatron_grace.adapters.deepspeed import setup_grace

    deepspeed.init_distributed()
    model = MyModel()                       # holds deepspeed.moe.layer.MoE(hidden, expert, num_experts=E, ep_size=G, k=...)
    for m in model.modules():               # DeepSpeed's expert-parallel groups (deepspeed.initialize does this too)
        if isinstance(m, deepspeed.moe.layer.MoE):
            m.set_deepspeed_parallelism()
    load_weights(model)
    layers = setup_grace(model, "plan.json", dispatch="hierarchical")   # every rank; collective
    model.eval(); out = model(x)            # MoE.forward still returns (output, l_aux, exp_counts)

To plan from the model's own routing, record it first with :class:`RoutingRecorder` (a
:class:`~megatron_grace.trace.RoutingTrace` of every rank's tokens; ``grace plan --trace``).

What changes: ``moe.deepspeed_moe`` (DeepSpeed's ``MOELayer``: gate, padded all-to-all, experts)
becomes a :class:`GraceMOELayer` holding DeepSpeed's gate and a core
:class:`~megatron_grace.layer.GraceMoELayer` in DeepSpeed's expert-parallel group for that
``ep_size``, with the plan's expert copies (weights moved once from DeepSpeed's experts).
``MoE.forward``, the residual branch and everything around the MoE stay DeepSpeed's / the model's.

Supported (anything else raises GraceInputError naming the module and the problem, on every rank):

- gating: DeepSpeed's ``TopKGate`` with any ``k`` (``top1gating``, ``top2gating`` with or without
  ``top2_2nd_expert_sampling``, ``topkgating``), ``use_rts``, ``used_token``, noisy gating
  (training mode only, as in DeepSpeed); routing identical to DeepSpeed's (:mod:`.gate`). Tokens are
  never dropped by default; ``drop_tokens=True`` drops what DeepSpeed's capacity drops;
- experts: ``Linear(h, f) -> exact GELU -> Linear(f, h)`` or SwiGLU ``down(silu(gate(x)) * up(x))``,
  as ``nn.Sequential`` or any module whose Linear layers compute that (checked numerically,
  :mod:`.experts`), with or without Linear biases, no other parameters;
  float32 / bfloat16 / float16 / float64;
- ``use_residual=True`` (PR-MoE): DeepSpeed's own ``MoE.forward`` mixes the residual MLP in;
- expert parallelism in DeepSpeed's groups (``ep_size`` = the plan's GPU count; ``ep_size`` smaller
  than the world, i.e. expert-data-parallel copies, included); every MoE of the model with the same
  ``num_experts`` and ``ep_size`` (one plan); the plan's layers are the MoE modules in module order.

Refused: tensor parallelism (``groups.mpu`` with tensor-parallel size > 1, expert tensor
parallelism), other gate classes, single-Linear experts, other activations (ReLU, tanh-GELU, ...),
different expert counts across layers, expert biases together with a patched checkpoint. Not provided: training (the GRACE layer
runs under ``torch.no_grad``), saving DeepSpeed checkpoints from a converted model (save the
original). Tested on CPU/gloo with deepspeed 0.19.8 (4 ranks); not run on GPUs/NCCL.

Importing this package imports DeepSpeed.
"""

from .convert import expert_parallel_group, moe_modules, setup_grace
from .experts import ExpertMLP, identify_expert
from .gate import gate_args, inference_gate, route
from .layer import GraceMOELayer
from .recorder import RoutingRecorder

__all__ = ["setup_grace", "moe_modules", "expert_parallel_group", "GraceMOELayer", "ExpertMLP", "identify_expert",
           "gate_args", "inference_gate", "route", "RoutingRecorder"]
