"""The operator's page of recent alarms: server-rendered HTML (:mod:`monitor.web.page`) and an
ASGI app to mount anywhere (:func:`monitor.web.app.alarm_app`; needs ``starlette``)."""
