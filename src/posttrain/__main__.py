"""``python -m posttrain``: the same command line as ``posttrain``."""

import sys

from posttrain.apps.cli import main

sys.exit(main())
