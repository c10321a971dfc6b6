"""The one way dfly builds its treq client: a persistent, quiet connection pool."""

from __future__ import annotations

from typing import Any

from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory


class _QuietFactory(_HTTP11ClientFactory):
    # Without this every pooled connection logs "Starting/Stopping factory".
    noisy = False


class QuietConnectionPool(HTTPConnectionPool):
    _factory = _QuietFactory


def make_http_client(reactor: Any) -> tuple[HTTPClient, HTTPConnectionPool]:
    """A treq client and its pool; close the pool (``closeCachedConnections``) on stop."""
    pool = QuietConnectionPool(reactor, persistent=True)
    return HTTPClient(Agent(reactor, pool=pool)), pool
