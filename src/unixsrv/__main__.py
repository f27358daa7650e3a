"""``python -m unixsrv``: the same as the ``unixsrv`` command."""

from .cli import main

raise SystemExit(main())
