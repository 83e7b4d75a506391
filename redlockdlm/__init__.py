"""redlockdlm: an OpenVMS-style distributed lock manager over independent Redis instances.

::

    from redlockdlm import DLM, Mode
    with DLM(["redis://127.0.0.1:7001", "redis://127.0.0.1:7002",
              "redis://127.0.0.1:7003"], namespace="shop") as dlm:
        with dlm.lock("db/orders", Mode.CR) as table:
            with table.lock("row:42", Mode.EX) as row:
                row.value = b"v7"
"""

from .aio import AsyncDLM, AsyncLock, AsyncMutex, AsyncRequest
from .client import DLM, Lock, Mutex, Request
from .engine.modes import Mode

__all__ = ["AsyncDLM", "AsyncLock", "AsyncMutex", "AsyncRequest", "DLM", "Lock", "Mode",
           "Mutex", "Request"]
__version__ = "0.1.0"
