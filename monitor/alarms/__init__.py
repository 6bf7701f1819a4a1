"""The record of alarms: a bounded log of recent alarms with thumbnails, an append-only JSONL
audit file rotated by size, and explanations computed on demand off the request path."""

from surprise_monitor.monitor.alarms.log import KINDS, AlarmLog, AlarmRecord
from surprise_monitor.monitor.alarms.sink import AuditFileBusyError, JsonlSink, read_records

__all__ = ["KINDS", "AlarmLog", "AlarmRecord", "AuditFileBusyError", "JsonlSink", "read_records"]
