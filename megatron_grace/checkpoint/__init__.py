"""Patch Megatron-Core and DeepSpeed MoE checkpoints to a GRACE placement, verify, unpatch, load per rank.

- :func:`patch_checkpoint` (``grace checkpoint patch SRC DST --plan P``): read a checkpoint the
  framework wrote (Megatron-Core ``torch_dist``, Megatron legacy per-rank ``torch``, DeepSpeed
  MoE) and write every GPU's expert slots as the plan places them (replicas included) as
  safetensors, the non-expert tensors once, the plan and a manifest with hashes
  (:mod:`~megatron_grace.checkpoint.manifest` describes the layout). Streamed one tensor at a
  time from its byte range in the source, hashed from the bytes written
  (:mod:`~megatron_grace.checkpoint.stream_copy`), into a temporary directory that is checked,
  fsynced and renamed.
- :func:`verify_checkpoint` (``verify DST [--against SRC]``): every hash, the manifest against the
  plan, and optionally every slot against the source expert, bit for bit.
- :func:`unpatch_checkpoint` (``unpatch DST OUT [--ep-size N]``): back to the framework's layout.
- :func:`load_rank_slots`: one rank's slots of one layer as a ``WeightSource`` for
  ``GraceMoELayer.from_full_weights``, reading only those bytes.

Nothing is unpickled beyond ``torch.load(weights_only=True)`` and a DCP-metadata-only unpickler.
"""

from megatron_grace.checkpoint.convert import expert_geometry, grace_state
from megatron_grace.checkpoint.detect import detect_format, open_source
from megatron_grace.checkpoint.loader import RankSlots, load_rank_slots
from megatron_grace.checkpoint.patch import PatchSummary, check_plan, patch_checkpoint
from megatron_grace.checkpoint.unpatch import UnpatchSummary, unpatch_checkpoint
from megatron_grace.checkpoint.verify import VerifyReport, verify_checkpoint

__all__ = ["patch_checkpoint", "verify_checkpoint", "unpatch_checkpoint", "load_rank_slots", "RankSlots", "PatchSummary",
           "UnpatchSummary", "VerifyReport", "check_plan", "detect_format", "open_source", "grace_state", "expert_geometry"]
