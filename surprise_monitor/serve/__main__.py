"""``python -m surprise_monitor.serve``: the same command as ``surprise-serve``."""

from surprise_monitor.serve.cli import main

if __name__ == "__main__":
    main()
