"""The outbox: every event committed to SQLite before it is forwarded, kept until its own PUBACK.

Split by job: :mod:`.store` appends, reads and acknowledges (the :class:`Outbox`); :mod:`.schema` holds the
tables, the connection's settings and the event-id scheme with its side-car files; :mod:`.eviction` decides
what leaves the file when a bound is hit; :mod:`.salvage` replaces a corrupt file. The history's query is
:mod:`gateway.uplink.history`. docs/storage.md gives the rules.
"""

from gateway.uplink.outbox.eviction import DAY_S, StorageLimits, disk_free_bytes
from gateway.uplink.outbox.schema import CACHE_KIB, EARLIER_SESSIONS_LISTED, MB, SCHEMA_VERSION, new_install_id
from gateway.uplink.outbox.store import FailureKind, Outbox, PendingEvent, failure_kind

__all__ = [
    "CACHE_KIB",
    "DAY_S",
    "EARLIER_SESSIONS_LISTED",
    "MB",
    "SCHEMA_VERSION",
    "FailureKind",
    "Outbox",
    "PendingEvent",
    "StorageLimits",
    "disk_free_bytes",
    "failure_kind",
    "new_install_id",
]
