"""Expert placement: topology, placement plans, planners."""
