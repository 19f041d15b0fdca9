"""``python -m snoo.lab``: the lab's command line (see docs/lab.md)."""

import sys

from snoo.lab.cli import main

sys.exit(main())
