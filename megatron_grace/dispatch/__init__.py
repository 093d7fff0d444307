"""Token dispatch for expert-parallel MoE with replicas: permutation, flat and hierarchical all-to-all.

- :mod:`~megatron_grace.dispatch.permute`: stable sort by destination key and its inverse;
- :mod:`~megatron_grace.dispatch.all_to_all`: uneven ``all_to_all_single``, count exchange,
  traffic log, the (rank, slot) exchange inside one group;
- :mod:`~megatron_grace.dispatch.flat`: one hop to the GPU of the chosen copy;
- :mod:`~megatron_grace.dispatch.hierarchical`: once per node to the peer GPU, then inside the node.
"""

from megatron_grace.dispatch.all_to_all import GroupSpec, SlotExchange, TrafficLog, all_to_all_uneven, exchange_counts
from megatron_grace.dispatch.flat import FlatDispatcher
from megatron_grace.dispatch.hierarchical import HierarchicalDispatcher, HierarchicalGroups
from megatron_grace.dispatch.pairs import RoutedPairs
from megatron_grace.dispatch.permute import Permutation, permute, sort_by_key, unpermute

DISPATCH_MODES = ("flat", "hierarchical")

__all__ = ["DISPATCH_MODES", "GroupSpec", "SlotExchange", "TrafficLog", "all_to_all_uneven", "exchange_counts", "FlatDispatcher",
           "HierarchicalDispatcher", "HierarchicalGroups", "RoutedPairs", "Permutation", "permute", "sort_by_key",
           "unpermute"]
