"""``python -m curvlab.cli``: the ``curvlab`` command line."""

from curvlab.cli.commands import main

raise SystemExit(main())
