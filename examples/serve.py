"""The surprise monitor's HTTP service: ``python examples/serve.py ...`` is ``surprise-serve ...``
(:mod:`surprise_monitor.serve`; flags: ``surprise-serve --help``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without an install
from surprise_monitor.serve.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
