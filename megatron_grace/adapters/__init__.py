"""Framework adapters: the GRACE MoE layer inside other frameworks.

- :mod:`megatron_grace.adapters.megatron`: Megatron-Core drop-in: a token dispatcher
  (``GraceTokenDispatcher``) chosen through the layer spec; Megatron's router, ``MoELayer.forward``
  and own experts (``SequentialMLP``, ``GroupedMLP``, ``TEGroupedMLP``) stay, re-placed by the plan at
  ``setup_grace``; routing recorder, runtime registration.
- :mod:`megatron_grace.adapters.deepspeed`: DeepSpeed-MoE (``deepspeed.moe.layer.MoE`` converted in
  place: DeepSpeed's gate, the core layer in DeepSpeed's expert-parallel group); routing recorder.

Importing :mod:`megatron_grace` or this package never imports Megatron or DeepSpeed. The DeepSpeed
sub-package imports DeepSpeed; the Megatron one imports ``megatron.core`` only on first use of a
name that needs it.
"""

__all__ = ["deepspeed", "megatron"]
