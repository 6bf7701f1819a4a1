"""The operator's page of recent alarms: server-rendered HTML
(:mod:`surprise_monitor.monitor.web.page`) and an ASGI app to mount anywhere
(:func:`surprise_monitor.monitor.web.app.alarm_app`; needs ``starlette``)."""
