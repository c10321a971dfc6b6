"""The one way dfly builds its treq client: a persistent, quiet connection pool, no cookies."""

from __future__ import annotations

from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory


class _QuietFactory(_HTTP11ClientFactory):
    # Without this every pooled connection logs "Starting/Stopping factory".
    noisy = False


class QuietConnectionPool(HTTPConnectionPool):
    _factory = _QuietFactory


def make_http_client(reactor: Any) -> tuple[HTTPClient, HTTPConnectionPool]:
    """A treq client and its pool; close the pool (``closeCachedConnections``) on stop.

    treq keeps a cookie jar per client; one client fetches for every caller
    (the supernode's source fetches carry each caller's credentials), so a
    cookie set for one caller must never go out with another's request: the
    jar accepts none.
    """
    pool = QuietConnectionPool(reactor, persistent=True)
    no_cookies = CookieJar(DefaultCookiePolicy(allowed_domains=[]))
    return HTTPClient(Agent(reactor, pool=pool), cookiejar=no_cookies), pool
