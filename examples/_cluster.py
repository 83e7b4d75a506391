"""Where the examples find Redis: DLM_REDIS (comma-separated URLs), or a development
cluster of three local redis-server processes started for the example and stopped after."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def instances() -> Iterator[list[str]]:
    urls = [u for u in os.environ.get("DLM_REDIS", "").split(",") if u]
    if urls:
        yield urls
        return
    from redlockdlm.devcluster import DevCluster

    with DevCluster(3) as cluster:
        yield list(cluster.urls)
