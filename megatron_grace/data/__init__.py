"""Data bundled with the package.

``qwen3-30b-a3b/``: per-layer expert load and within-layer co-activation pairs of
Qwen3-30B-A3B (48 MoE layers x 128 experts, top-8; 75,773 decode tokens of greedy decoding
over codealpaca-style prompts, IQ3_XXS GGUF), from doramirdor/mbolt
(commit e7e9dbf770b6b7171f47a42173dfcf01c083d819, ``results/colibri-119/``), MIT licence,
Copyright (c) 2026 Dor Amir; see ``qwen3-30b-a3b/LICENSE``. It is the default dataset of
``grace demo``, ``grace stats`` and the docs.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

BUNDLED_MODEL = "qwen3-30b-a3b"


def bundled_stats_path() -> Path:
    """Path of the bundled Qwen3-30B-A3B load-and-pairs ``.npz``."""
    return Path(str(resources.files(__name__) / "qwen3-30b-a3b" / "qwen3_30b_a3b_load_and_pairs.npz"))


def load_bundled_stats():
    """The bundled Qwen3-30B-A3B statistics as an :class:`~megatron_grace.statistics.ExpertStats`.

    Load ``[48, 128]`` is complete; co-activation holds the source's thresholded pairs
    (``coactivation_observed`` marks them); there are no between-layer transitions.
    """
    from megatron_grace.trace.importers import import_qwen_coactivation

    return import_qwen_coactivation(bundled_stats_path())
