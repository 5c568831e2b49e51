"""`python -m incr_cli ...` (what torchrun launches) is the same as `incr ...`."""

import sys

from incr_cli.cli import console_main

sys.exit(console_main())
