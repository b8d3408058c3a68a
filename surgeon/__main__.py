"""``python -m surgeon``: the ``surgeon`` command line."""

from surgeon.cli import main

raise SystemExit(main())
