"""`python -m worker_agent ...` is the same as the `idlegrid-agent` console script."""

import sys

from worker_agent.cli import main

sys.exit(main())
