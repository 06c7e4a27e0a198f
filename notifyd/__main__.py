"""Allow ``python -m notifyd``."""

from notifyd.cli import main

raise SystemExit(main())
