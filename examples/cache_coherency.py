"""Cache coherency with value blocks and blocking notifications.

Readers cache a configuration value under a PR lock and keep the lock; the value block
carries the value and its version. A writer asks for EX: every reader gets a blocking
notification, drops its cache and releases; the writer stores the new value in the value
block when it releases; readers take PR again and read the new version without touching
the backing store.
Run: python examples/cache_coherency.py
"""

from __future__ import annotations

import threading

from _cluster import instances

from redlockdlm import DLM, Mode


class CachedConfig:
    def __init__(self, dlm: DLM) -> None:
        self.dlm = dlm
        self.invalidated = threading.Event()
        self.lock = None
        self.value = None

    def read(self) -> bytes | None:
        if self.lock is None:
            self.invalidated.clear()
            self.lock = self.dlm.lock("config/pricing", Mode.PR,
                                      on_blocking=lambda mode: self.invalidated.set())
            self.value = self.lock.value
        return self.value

    def drop_if_asked(self) -> None:
        if self.invalidated.is_set() and self.lock is not None:
            self.lock.release()
            self.lock, self.value = None, None


def main() -> None:
    with instances() as urls:
        keeper = DLM(urls, namespace="example")
        keeper.lock("config/pricing", Mode.NL)  # keeps the value block alive
        readers = [CachedConfig(DLM(urls, namespace="example")) for _ in range(2)]
        writer = DLM(urls, namespace="example")
        with writer.lock("config/pricing", Mode.EX) as w:
            w.value = b"price=10"
        print("readers see:", [r.read() for r in readers])
        req = writer.enqueue("config/pricing", Mode.EX)
        for r in readers:
            r.invalidated.wait(5)
            r.drop_if_asked()
        w = req.wait(5)
        w.value = b"price=12"
        w.release()
        seen = [r.read() for r in readers]
        print("after the write readers see:", seen)
        assert seen == [b"price=12", b"price=12"]
        for r in readers:
            r.dlm.close()
        writer.close()
        keeper.close()


if __name__ == "__main__":
    main()
