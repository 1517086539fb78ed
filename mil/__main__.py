"""``python -m mil …``: the ``mil`` command (also what ``torchrun -m mil train …`` runs)."""

import sys

from mil.cli import main

sys.exit(main())
