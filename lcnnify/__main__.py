"""``python -m lcnnify``: the ``lcnnify`` command (see :mod:`lcnnify.cli`)."""
from lcnnify.cli import main

if __name__ == "__main__":  # guard: the demo's worker processes (spawn) re-import this module
    raise SystemExit(main())
