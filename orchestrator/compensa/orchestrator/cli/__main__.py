"""`python -m compensa.orchestrator.cli`: the `compensa` command."""

import sys

from compensa.orchestrator.cli import main

sys.exit(main())
