"""``python -m posttrain.cli`` (the spelling of earlier releases; ``python -m posttrain`` is the same)."""

import sys

from posttrain.apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
