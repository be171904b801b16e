"""`python -m bench <scenario>`: see bench/scale/cli.py and bench/README.md."""

import sys

from bench.scale.cli import main

sys.exit(main())
