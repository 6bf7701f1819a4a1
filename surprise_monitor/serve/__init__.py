"""The HTTP inference service watched by the surprise monitor: the FastAPI app
(:func:`surprise_monitor.serve.app.create_app`), the command line ``surprise-serve``
(:mod:`surprise_monitor.serve.cli`, also ``python -m surprise_monitor.serve``) and the Prometheus
rules and Grafana dashboard it ships (:mod:`surprise_monitor.serve.config_files`,
``surprise-serve --write-config DIR``).

Needs the ``[serve]`` extra (FastAPI, uvicorn, Starlette):
``pip install 'surprise-monitor[serve]'``. This package is the top of the floor plan: it
imports the monitor and the table; nothing in the library imports it. Importing it imports
neither FastAPI nor uvicorn.
"""
