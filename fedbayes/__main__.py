"""``python -m fedbayes …`` is the ``fedbayes`` command (:mod:`fedbayes.cli`)."""

from fedbayes.cli import main

raise SystemExit(main())
