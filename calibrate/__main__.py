"""``python -m surprise_monitor.calibrate`` runs the ``surprise-calibrate`` command line."""

import sys

from surprise_monitor.calibrate.cli import main

sys.exit(main())
