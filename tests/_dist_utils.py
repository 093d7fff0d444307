"""Tests spawn gloo ranks with the package's launcher (see :mod:`megatron_grace.layer.launch`)."""

from megatron_grace.layer.launch import free_port, run_distributed

__all__ = ["free_port", "run_distributed"]
