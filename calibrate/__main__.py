"""``python -m calibrate`` runs the ``surprise-calibrate`` command line."""

import sys

from calibrate.cli import main

sys.exit(main())
