"""``python -m megatron_grace`` runs the ``grace`` command."""

import sys

from megatron_grace.cli.main import main

sys.exit(main())
