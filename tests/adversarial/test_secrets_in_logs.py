"""Item 5 of the trust-boundary issue: secrets stay out of URLs and logs.

Task keys travel in ``X-Dfly-Task-Key`` (tests/test_uploader.py,
tests/test_supernode_api.py refuse the old ``?k=``); access log lines carry
no query, where signed URLs keep their signatures and tokens; every other
line is redacted on its way out (`dfly.logs.redact`).
"""

from __future__ import annotations

import io
import os

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

from dfly.logs import line_observer, redact
from dfly.urls import access_log_uri
from dfly.webbounds import BoundedSite
from tests.test_integration import IntegrationTestCase


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


class LogRedactionTests(IntegrationTestCase):
    """Every line dfly writes goes through `redact`: a download with credentials leaves none in the log."""

    async def test_a_download_with_credentials_logs_none_of_them(self) -> None:
        out = io.StringIO()
        observer = line_observer(out, "test")
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        served = self.serve("private.bin", os.urandom(5000), auth=True)
        await self.start_supernode()
        req = self.request(served.url + "?X-Amz-Signature=s1gnatur3&keep=1", headers={"Authorization": "Bearer good"})
        result = await self.download(req)
        self.assertTrue(result.success, result.line())
        answer = self.registered()
        text = out.getvalue()
        self.assertIn("do register to", text)  # the answer is logged, redacted
        for secret in (answer["key"], answer["peerSecret"], "s1gnatur3", "Bearer good"):
            self.assertNotIn(secret, text)

    def test_redact(self) -> None:
        self.assertEqual(redact('res:{"key": "0123", "peerSecret": "Zm9v", "taskId": "ab"}'),
                         'res:{"key": "***", "peerSecret": "***", "taskId": "ab"}')
        self.assertEqual(redact("GET /b?X-Amz-Signature=abc&X-Amz-Date=1&sig=x"), "GET /b?X-Amz-Signature=***&X-Amz-Date=1&sig=***")
        self.assertEqual(redact("--header 'Authorization: Bearer abc.def.ghi'"), "--header 'Authorization: ***'")
        self.assertEqual(redact("http://u:p@h/x"), "http://***@h/x")

    def test_redact_headers_in_a_python_repr(self) -> None:
        """A logged dict or Headers repr hides credential header values, quoted with ' or ", str or bytes."""
        self.assertEqual(redact("{'X-Dfly-Cluster-Token': 'abc123', 'Accept': 'x'}"),
                         "{'X-Dfly-Cluster-Token': '***', 'Accept': 'x'}")
        self.assertEqual(redact('Headers({b"x-dfly-task-key": [b"k3y"], b"range": [b"bytes=0-1"]})'),
                         'Headers({b"x-dfly-task-key": [b"***"], b"range": [b"bytes=0-1"]})')
        self.assertEqual(redact("(b'cookie', [b'session=1'])"), "(b'cookie', [b'***'])")
