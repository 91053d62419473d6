"""`python -m orchestrator.cli`: the `compensa` command."""

import sys

from orchestrator.cli import main

sys.exit(main())
