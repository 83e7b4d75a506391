"""The pytest plugin of `redlockdlm.testing`: fixtures giving fake instances in-process.

Registered as the `redlockdlm` entry point of `pytest11`, so installing redlockdlm makes
these fixtures available to every test suite (nothing is imported or started until a test
asks for one; without fakeredis and lupa that test fails with FakesUnavailable):

- `dlm_fake_cluster`: a started `redlockdlm.testing.FakeCluster` of 3 fresh instances, its
  own for the test (`.urls` for more clients: two DLMs on it contend for the same locks);
- `dlm_fake`: a `redlockdlm.DLM` on that cluster (namespace "test"), closed after the test;
- `async_dlm_fake`: a function that makes `redlockdlm.AsyncDLM`s on that cluster, to be
  called inside the test's event loop (``async with async_dlm_fake() as dlm:``); a fixture
  cannot create one without knowing which loop the test runs (asyncio.run, pytest-asyncio,
  anyio), so none is required.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .aio import AsyncDLM
    from .client import DLM
    from .testing import FakeCluster


@pytest.fixture
def dlm_fake_cluster() -> Iterator[FakeCluster]:
    """Three fresh fake instances for this test, stopped after it."""
    from .testing import FakeCluster

    with FakeCluster(3) as cluster:
        yield cluster


@pytest.fixture
def dlm_fake(dlm_fake_cluster: FakeCluster) -> Iterator[DLM]:
    """A DLM (namespace "test") on `dlm_fake_cluster`; closed after the test, which
    releases whatever it still holds."""
    from .client import DLM

    with DLM(dlm_fake_cluster.urls, "test") as dlm:
        yield dlm


@pytest.fixture
def async_dlm_fake(dlm_fake_cluster: FakeCluster) -> Callable[..., AsyncDLM]:
    """`make(namespace="test", **options)`: a new AsyncDLM on `dlm_fake_cluster`, for
    ``async with make() as dlm:`` inside the test's event loop (it closes it)."""
    from .aio import AsyncDLM

    def make(namespace: str = "test", **options: Any) -> AsyncDLM:
        return AsyncDLM(dlm_fake_cluster.urls, namespace, **options)

    return make
