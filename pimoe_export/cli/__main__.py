"""`python -m pimoe_export.cli` = `pimoe-export`."""

import sys

from pimoe_export.cli import main

sys.exit(main())
