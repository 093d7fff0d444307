"""The ``grace`` command line."""
