"""`python -m a2k` runs the command line (where the `a2k` script is not installed)."""

from a2k.cli import main

raise SystemExit(main())
