"""``python -m jaxnet train ...``: the same as the ``jaxnet`` command."""

from .cli import main

raise SystemExit(main())
