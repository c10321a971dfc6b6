"""Item 5 of the trust-boundary issue (its first part): secrets stay out of URLs and access logs.

Task keys travel in ``X-Dfly-Task-Key`` (tests/test_uploader.py,
tests/test_supernode_api.py refuse the old ``?k=``); access log lines carry
no query, where signed URLs keep their signatures and tokens.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

from dfly.urls import access_log_uri
from dfly.webbounds import BoundedSite


class AccessLogTests(SynchronousTestCase):
    def test_an_access_line_has_no_query(self) -> None:
        site = BoundedSite(Resource())
        request = DummyRequest([b"peer", b"file"])
        request.uri = b"/peer/file/abc?k=0123456789abcdef&X-Amz-Signature=s3cr3t"
        request.method, request.clientproto, request.code, request.sentLength = b"GET", b"HTTP/1.1", 200, 10
        line = site._logFormatter("[04/Dec/2026:21:00:00 +0000]", request)
        self.assertNotIn("0123456789abcdef", line)
        self.assertNotIn("s3cr3t", line)
        self.assertIn('"GET /peer/file/abc?... HTTP/1.1" 200 10', line)

    def test_access_log_uri(self) -> None:
        self.assertEqual(access_log_uri("/v2/x/blobs/sha256:ab?token=t0k3n&sig=1"), "/v2/x/blobs/sha256:ab?...")
        self.assertEqual(access_log_uri("http://u:p@h/x"), "http://***@h/x")
        self.assertEqual(access_log_uri("/plain"), "/plain")
