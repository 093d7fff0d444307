"""Framework adapters: the GRACE MoE layer inside other frameworks.

- :mod:`megatron_grace.adapters.megatron`: Megatron-Core drop-in (layer spec, ``MoELayer``
  subclass, weight conversion from ``SequentialMLP``, routing recorder, runtime registration).
- :mod:`megatron_grace.adapters.deepspeed`: DeepSpeed-MoE (``deepspeed.moe.layer.MoE`` converted in
  place: DeepSpeed's gate, the core layer in DeepSpeed's expert-parallel group).

Adapters import their framework lazily: importing :mod:`megatron_grace` or this package never
imports Megatron or DeepSpeed; only importing an adapter sub-package does.
"""

__all__ = ["deepspeed", "megatron"]
