"""``python -m pangu_fastkd.ascend_smoke``; the flags are in cli.py."""

import sys

from .cli import main

sys.exit(main())
