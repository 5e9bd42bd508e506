"""`python -m idlegrid_client ...` is the same as the `idlegrid` console script."""

import sys

from idlegrid_client.cli import main

sys.exit(main())
