"""The supernode's register API through StubTreq, over a fake origin.

Everything is in memory: the klein resource is driven by one `StubTreq`, and
the `SourceClient` inside the real `TaskManager` talks to `Origin` (a small
twisted.web resource) through a second one.  The CDN fetch really streams:
``unbuffered=True`` responses from StubTreq deliver their body to
``deliverBody`` as the origin writes it, so a test can hand out a piece's
bytes and watch a held pull wake up.  ``pump`` moves bytes on both links;
the supernode's clock is a `Clock` the tests advance.
"""

from __future__ import annotations

import functools
import ipaddress
import hashlib
import json
import random
import re
from typing import Any

import treq
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource, getChildForRequest
from twisted.web.server import NOT_DONE_YET, Request
from twisted.web.test.requesthelper import DummyRequest

import dfly
from dfly import codes
from dfly.jsonapi import FastRoutes
from dfly.pieces import DEFAULT_PIECE_SIZE, task_id
from dfly.source import SourceClient
from dfly.supernode.api import SupernodeApi
from dfly.supernode.cdn import CdnCache, CdnFiles
from dfly.supernode.peerauth import PeerNetworks
from dfly.supernode.policy import SchedulerPolicy
from dfly.supernode.tasks import HUNG_UP_GRACE, SILENCE, TaskManager

FINISHED_SILENCE = SchedulerPolicy().finished_silence

P = DEFAULT_PIECE_SIZE
ORIGIN = "http://origin.test"
CDN_IP = "10.0.0.9"
CDN_PORT = 8001
SECRET = b"Bearer s3cret"
POLL_TIMEOUT = 5.0


@functools.cache
def payload(length: int, seed: int = 0) -> bytes:
    """Reproducible bytes, different in every piece (so digests differ)."""
    return random.Random(seed).randbytes(length)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


SMALL = 1000  # one short piece
TWO = P + 10  # two pieces, the second short
FIVE = 4 * P + 1234  # five pieces: one more than a peer may run at once


class Origin(Resource):
    """A fake origin: serves bytes by path, guards some, and records every request.

    ``streams`` paths answer headers only and keep the request in ``held``;
    the test writes their body.  ``silent`` paths do not even answer headers.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[bytes, bytes] = {}
        self.secrets: dict[bytes, bytes] = {}  # path -> Authorization it needs, else 401
        self.signatures: dict[bytes, bytes] = {}  # path -> ?sig= it needs, else 403
        self.etags: dict[bytes, bytes] = {}
        self.statuses: dict[bytes, int] = {}  # path -> a fixed error status
        self.streams: dict[bytes, int | None] = {}  # path -> Content-Length (None: chunked)
        self.silent: set[bytes] = set()
        self.requests: list[tuple[bytes, Headers]] = []
        self.held: list[Request] = []

    def count(self, path: bytes) -> int:
        return sum(1 for p, _ in self.requests if p == path)

    def headers(self, index: int, name: bytes) -> list[bytes] | None:
        """The values of one header of the ``index``-th request."""
        return self.requests[index][1].getRawHeaders(name)

    def render_GET(self, request: Request) -> Any:
        path = request.path
        self.requests.append((path, request.requestHeaders.copy()))
        if path in self.silent:
            self.held.append(request)
            return NOT_DONE_YET
        if path in self.statuses:
            request.setResponseCode(self.statuses[path])
            return b"origin error\n"
        secret = self.secrets.get(path)
        if secret is not None and request.getHeader(b"authorization") != secret:
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Bearer realm="origin"')
            return b"who are you?\n"
        signature = self.signatures.get(path)
        if signature is not None and request.args.get(b"sig") != [signature]:
            request.setResponseCode(403)
            return b"bad signature\n"
        if path in self.streams:
            length = self.streams[path]
            if length is not None:
                request.setHeader(b"content-length", b"%d" % length)
            request.write(b"")  # the headers go out; the body is the test's
            self.held.append(request)
            return NOT_DONE_YET
        body = self.files.get(path)
        if body is None:
            request.setResponseCode(404)
            return b"no such file\n"
        etag = self.etags.get(path)
        if etag is not None:
            request.setHeader(b"etag", etag)
            if request.getHeader(b"if-none-match") == etag:
                request.setResponseCode(304)
                return b""
        wanted = request.getHeader(b"range")
        if wanted is not None:
            match = re.fullmatch(rb"bytes=(\d+)-(\d+)", wanted)
            assert match is not None, wanted
            start, end = int(match.group(1)), int(match.group(2))
            if start >= len(body):
                request.setResponseCode(416)
                request.setHeader(b"content-range", b"bytes */%d" % len(body))
                return b""
            end = min(end, len(body) - 1)
            request.setResponseCode(206)
            request.setHeader(b"content-range", b"bytes %d-%d/%d" % (start, end, len(body)))
            return body[start : end + 1]
        return body


class Answer:
    """One API answer: status, headers and body; ``json()`` insists on JSON."""

    def __init__(self, status: int, headers: Headers, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        assert self.headers.getRawHeaders(b"content-type") == [b"application/json"], self.headers
        return json.loads(self.body)

    @property
    def code(self) -> int:
        return int(self.json()["code"])

    @property
    def data(self) -> Any:
        return self.json().get("data")

    def __repr__(self) -> str:
        return f"Answer({self.status}, {self.body[:300]!r})"


def registration(url: str = f"{ORIGIN}/file", cid: str = "peer-1", **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"url": url, "cid": cid, "ip": "192.0.2.1", "port": 15001, "hostName": "host1"}
    body.update(fields)
    return body


class SupernodeApiTestCase(SynchronousTestCase):
    """A supernode over a fake origin; helpers to call it and pump both links.

    Subclasses may set ``origin_class`` and ``options`` (TaskManager keywords).
    """

    origin_class: type = Origin
    options: dict[str, Any] = {}

    def setUp(self) -> None:
        self.clock = Clock()
        self.secrets: dict[str, str] = {}  # cid -> the peer secret its last registration got
        self.origin = self.origin_class()
        self.origin_http = StubTreq(self.origin)
        self.home = self.mktemp()
        self.start_supernode()

    def start_supernode(self, advertise_ip: str | None = CDN_IP) -> None:
        """A fresh TaskManager and API over ``self.home`` (as after a restart)."""
        self.cache = CdnCache(self.home)
        source = SourceClient(http=self.origin_http, clock=self.clock)
        self.tasks = TaskManager(self.cache, source, self.clock, poll_timeout=POLL_TIMEOUT, **self.options)
        self.addCleanup(self.tasks.stop)
        self.http = StubTreq(self.api(advertise_ip).resource())

    def api(self, advertise_ip: str | None, port: int = CDN_PORT) -> SupernodeApi:
        """The API over ``self.tasks``.

        The fake peers advertise 192.0.2.x, all through StubTreq's one client
        address: trusted, like a NAT'd network, and with no registration rate
        limit (one fake client registers hundreds at once).  Both checks have
        their own tests, tests/adversarial/test_peer_auth.py.
        """
        everyone = PeerNetworks(trusted=(ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")))
        return SupernodeApi(self.tasks, port, advertise_ip, networks=everyone, registration_rate=0)

    def pump(self) -> None:
        for _ in range(4):
            self.origin_http.flush()
            self.http.flush()

    def start(self, method: str, path: str, **kwargs: Any) -> Deferred[Answer]:
        """A request; a call about a registered cid carries that cid's peer secret, as a peer's does."""
        params = kwargs.get("params") or {}
        cid = params.get("srcCid") or params.get("cid")
        if cid in self.secrets and "headers" not in kwargs:
            kwargs["headers"] = {codes.PEER_SECRET_HEADER: self.secrets[cid]}
        d = self.http.request(method, "http://supernode.test" + path, **kwargs)

        def answered(r: Any) -> Deferred[Answer]:
            def made(body: bytes) -> Answer:
                answer = Answer(r.code, r.headers, body)
                if path == "/peer/registry" and r.code == 200:
                    self.secrets[kwargs["json"]["cid"]] = answer.data["peerSecret"]
                return answer
            return treq.content(r).addCallback(made)

        return d.addCallback(answered)

    def call(self, method: str, path: str, **kwargs: Any) -> Answer:
        d = self.start(method, path, **kwargs)
        self.pump()
        return self.successResultOf(d)

    def register(self, url: str = f"{ORIGIN}/file", cid: str = "peer-1", **fields: Any) -> Answer:
        return self.call("POST", "/peer/registry", json=registration(url, cid, **fields))

    def register_ok(self, url: str = f"{ORIGIN}/file", cid: str = "peer-1", **fields: Any) -> str:
        answer = self.register(url, cid, **fields)
        self.assertEqual((answer.status, answer.code), (200, 200), answer)
        return str(answer.data["taskId"])

    def start_pull(self, tid: str, cid: str = "peer-1", **params: str) -> Deferred[Answer]:
        return self.start("GET", "/peer/task", params={"taskId": tid, "srcCid": cid, **params})

    def pull(self, tid: str, cid: str = "peer-1", **params: str) -> Answer:
        d = self.start_pull(tid, cid, **params)
        self.pump()
        return self.successResultOf(d)

    def report(self, tid: str, piece_range: str, cid: str = "peer-1", ok: bool = True) -> Answer:
        if ok:
            return self.call("GET", "/peer/piece/suc", params={"taskId": tid, "cid": cid, "pieceRange": piece_range})
        return self.call(
            "GET", "/peer/piece/error",
            params={"taskId": tid, "cid": cid, "range": piece_range, "kind": "digest mismatch"},
        )

    def serve(self, name: bytes, length: int) -> str:
        """Put a file of ``length`` bytes on the origin; returns its URL."""
        self.origin.files[name] = payload(length)
        return ORIGIN + name.decode()

    def pieces(self, answer: Answer) -> list[int]:
        self.assertEqual((answer.status, answer.code), (200, 601), answer)
        return [p["pieceNum"] for p in answer.data]


class RegistrationTests(SupernodeApiTestCase):
    def test_registration_returns_task_id_length_and_piece_size(self) -> None:
        """A good registration answers 200 with taskId, fileLength and pieceSize."""
        url = self.serve(b"/file", SMALL)
        answer = self.register(url)
        self.assertEqual(
            (answer.status, answer.code, answer.data),
            (200, 200, {"taskId": task_id(url), "fileLength": SMALL, "pieceSize": P,
                        "key": self.tasks.key_for(task_id(url)), "peerSecret": self.tasks.task(task_id(url)).peers["peer-1"].secret}),
        )
        self.assertRegex(answer.data["key"], r"\A[0-9a-f]{32}\Z")

    def test_registration_with_md5_uses_it_in_the_task_id(self) -> None:
        """The md5 (lower-cased) is part of the task id."""
        url = self.serve(b"/file", SMALL)
        answer = self.register(url, md5="0123456789ABCDEF0123456789ABCDEF")
        self.assertEqual(answer.data["taskId"], task_id(url, "0123456789abcdef0123456789abcdef"))

    def test_registration_accepts_dragonfly_raw_url(self) -> None:
        """``rawUrl`` is accepted as Dragonfly's spelling of ``url``."""
        url = self.serve(b"/file", SMALL)
        body = registration(url)
        body["rawUrl"] = body.pop("url")
        answer = self.call("POST", "/peer/registry", json=body)
        self.assertEqual((answer.status, answer.data["taskId"]), (200, task_id(url)))

    def test_filtered_query_keys_make_one_task(self) -> None:
        """URLs differing only in a filtered query key share one task id."""
        self.serve(b"/signed", SMALL)
        first = self.register_ok(f"{ORIGIN}/signed?a=1&sig=x", filter="sig")
        second = self.register_ok(f"{ORIGIN}/signed?a=1&sig=y", cid="peer-2", filter=["sig"])
        self.assertEqual(first, second)

    def test_registration_sends_callers_headers_to_the_origin(self) -> None:
        """The source is opened with the caller's headers."""
        url = self.serve(b"/file", SMALL)
        self.register_ok(url, headers=["X-Trace: abc"])
        self.assertEqual(self.origin.headers(0, b"x-trace"), [b"abc"])

    def test_registration_does_not_forward_hop_headers(self) -> None:
        """A caller's Range header is not sent to the origin (the CDN fetches it all)."""
        url = self.serve(b"/file", SMALL)
        self.register_ok(url, headers={"Range": "bytes=10-20"})
        self.assertIsNone(self.origin.headers(0, b"range"))

    def test_registration_fetches_the_file_into_the_cache(self) -> None:
        """After the CDN fetch the data file holds the origin's bytes."""
        url = self.serve(b"/file", TWO)
        tid = self.register_ok(url)
        with open(self.cache.data_path(tid), "rb") as f:
            self.assertEqual(f.read(), payload(TWO))

    def test_concurrent_registrations_open_the_source_once(self) -> None:
        """A second registration while the task is opening waits for it, not the origin."""
        self.origin.silent.add(b"/slow")
        first = self.start("POST", "/peer/registry", json=registration(f"{ORIGIN}/slow"))
        second = self.start("POST", "/peer/registry", json=registration(f"{ORIGIN}/slow", cid="peer-2"))
        self.pump()
        self.assertNoResult(second)
        held = self.origin.held[0]
        held.setHeader(b"content-length", b"%d" % SMALL)
        held.write(payload(SMALL))
        held.finish()
        self.pump()
        answers = [self.successResultOf(first), self.successResultOf(second)]
        self.assertEqual(
            ([a.status for a in answers], self.origin.count(b"/slow")),
            ([200, 200], 1),
        )


class BadRegistrationTests(SupernodeApiTestCase):
    def assertRefused(self, answer: Answer, status: int = 400, code: int = 501, words: str = "") -> None:
        self.assertEqual((answer.status, answer.code), (status, code), answer)
        self.assertIn(words, answer.json()["msg"])

    def test_bad_json_is_400_code_501(self) -> None:
        """A body that is not JSON is 400 with code 501 and a JSON reason."""
        self.assertRefused(self.call("POST", "/peer/registry", data=b"{not json"), words="JSON")

    def test_json_that_is_not_an_object_is_400(self) -> None:
        """A JSON array is not a registration."""
        self.assertRefused(self.call("POST", "/peer/registry", json=[1, 2]), words="object")

    def test_body_over_64_kib_is_413(self) -> None:
        """A body larger than 64 KiB is refused with 413 before parsing."""
        body = json.dumps(registration(hostName="h" * 65536)).encode()
        self.assertRefused(self.call("POST", "/peer/registry", data=body), status=413, words="larger")

    def test_body_of_exactly_64_kib_is_read(self) -> None:
        """A 64 KiB body is within the limit (here it then fails on its missing cid)."""
        body = json.dumps({"url": f"{ORIGIN}/file", "pad": ""}).encode()
        body = json.dumps({"url": f"{ORIGIN}/file", "pad": "p" * (65536 - len(body))}).encode()
        self.assertEqual(len(body), 65536)
        self.assertRefused(self.call("POST", "/peer/registry", data=body), words="cid")

    def test_missing_cid_is_400(self) -> None:
        """A registration without a cid is refused."""
        body = registration()
        del body["cid"]
        self.assertRefused(self.call("POST", "/peer/registry", json=body), words="cid")

    def test_bad_ip_is_400(self) -> None:
        """An ip that is no IP address is refused."""
        self.assertRefused(self.register(ip="300.1.2.3"), words="ip")

    def test_bad_port_is_400(self) -> None:
        """A port outside 0-65535 is refused."""
        self.assertRefused(self.register(port=70000), words="port")

    def test_boolean_port_is_400(self) -> None:
        """``true`` is not a port, although Python calls it an int."""
        self.assertRefused(self.register(port=True), words="port")

    def test_md5_with_identifier_is_400(self) -> None:
        """md5 and identifier together are refused."""
        answer = self.register(md5="0" * 32, identifier="v1")
        self.assertRefused(answer, words="md5 or identifier")

    def test_bad_md5_is_400(self) -> None:
        """An md5 that is not 32 hex digits is refused."""
        self.assertRefused(self.register(md5="xyz"), words="md5")

    def test_ftp_url_is_400(self) -> None:
        """Only http and https URLs are accepted."""
        self.assertRefused(self.register("ftp://origin.test/file"), words="http")

    def test_missing_url_is_400(self) -> None:
        """A registration without a URL is refused."""
        body = registration()
        del body["url"]
        self.assertRefused(self.call("POST", "/peer/registry", json=body), words="URL")

    def test_malformed_header_line_is_400(self) -> None:
        """A header line without a colon is refused."""
        self.assertRefused(self.register(headers=["no colon here"]), words="header")

    def test_cdn_cid_is_400(self) -> None:
        """A peer cannot register under the CDN's cid prefix."""
        self.assertRefused(self.register(cid=f"cdnnode:{CDN_IP}~x"), words="cid")

    def test_refused_registration_does_not_touch_the_origin(self) -> None:
        """Validation happens before any source request."""
        self.register(port=-1)
        self.assertEqual(self.origin.requests, [])


class SourceRefusalTests(SupernodeApiTestCase):
    def test_source_404_is_http_404_code_607(self) -> None:
        """A missing source file is HTTP 404 with Dragonfly's code 607."""
        answer = self.register(f"{ORIGIN}/missing")
        self.assertEqual((answer.status, answer.code), (404, 607))

    def test_source_404_is_remembered(self) -> None:
        """A second registration within 3 minutes is refused without asking the origin."""
        self.register(f"{ORIGIN}/missing")
        self.clock.advance(179)
        answer = self.register(f"{ORIGIN}/missing")
        self.assertEqual((answer.status, answer.code, self.origin.count(b"/missing")), (404, 607, 1))

    def test_source_404_is_asked_again_after_three_minutes(self) -> None:
        """After 181 s the origin is asked again (and now has the file)."""
        self.register(f"{ORIGIN}/missing")
        self.clock.advance(181)
        self.serve(b"/missing", SMALL)
        answer = self.register(f"{ORIGIN}/missing")
        self.assertEqual((answer.status, self.origin.count(b"/missing")), (200, 2))

    def test_source_401_is_http_403_code_608(self) -> None:
        """A source that wants credentials is HTTP 403 with code 608."""
        url = self.serve(b"/private", SMALL)
        self.origin.secrets[b"/private"] = SECRET
        answer = self.register(url)
        self.assertEqual((answer.status, answer.code), (403, 608))

    def test_source_401_is_not_remembered(self) -> None:
        """A refusal for one caller's credentials does not block the next caller."""
        url = self.serve(b"/private", SMALL)
        self.origin.secrets[b"/private"] = SECRET
        self.register(url)
        answer = self.register(url, headers=[f"Authorization: {SECRET.decode()}"])
        self.assertEqual(answer.status, 200)

    def test_right_authorization_header_registers(self) -> None:
        """With the Authorization the origin wants, registration succeeds."""
        url = self.serve(b"/private", SMALL)
        self.origin.secrets[b"/private"] = SECRET
        answer = self.register(url, headers={"Authorization": SECRET.decode()})
        self.assertEqual((answer.status, answer.data["fileLength"]), (200, SMALL))

    def test_caller_without_credentials_is_refused_on_an_existing_task(self) -> None:
        """The task exists and is cached, yet a caller without credentials gets 403/608."""
        url = self.serve(b"/private", SMALL)
        self.origin.secrets[b"/private"] = SECRET
        self.register_ok(url, headers={"Authorization": SECRET.decode()})
        answer = self.register(url, cid="peer-2")
        self.assertEqual((answer.status, answer.code, self.origin.count(b"/private")), (403, 608, 2))

    def test_refused_caller_is_not_added_to_the_task(self) -> None:
        """A caller refused by the origin cannot pull the task's pieces."""
        url = self.serve(b"/private", SMALL)
        self.origin.secrets[b"/private"] = SECRET
        tid = self.register_ok(url, headers={"Authorization": SECRET.decode()})
        self.register(url, cid="peer-2")
        self.assertEqual(self.pull(tid, "peer-2").status, 404)

    def test_new_headers_on_an_existing_task_are_probed_at_the_origin(self) -> None:
        """A second peer with other headers is checked with a 1-byte GET carrying them."""
        url = self.serve(b"/file", SMALL)
        self.register_ok(url)
        self.register_ok(url, cid="peer-2", headers=["X-Token: t2"])
        self.assertEqual(
            (self.origin.count(b"/file"), self.origin.headers(1, b"range"), self.origin.headers(1, b"x-token")),
            (2, [b"bytes=0-0"], [b"t2"]),
        )

    def test_known_headers_on_an_existing_task_are_not_probed_again(self) -> None:
        """A second peer with the same headers is admitted without asking the origin."""
        url = self.serve(b"/file", SMALL)
        self.register_ok(url, headers=["X-Token: t1"])
        self.register_ok(url, cid="peer-2", headers=["X-Token: t1"])
        self.assertEqual(self.origin.count(b"/file"), 1)

    def test_caller_with_a_bad_signature_is_refused_on_a_filtered_task(self) -> None:
        """A signed URL whose signature is filtered out of the task id is still checked."""
        self.serve(b"/signed", SMALL)
        self.origin.signatures[b"/signed"] = b"good"
        self.register_ok(f"{ORIGIN}/signed?sig=good", filter="sig")
        answer = self.register(f"{ORIGIN}/signed?sig=forged", cid="peer-2", filter="sig")
        self.assertEqual((answer.status, answer.code), (403, 608))

    def test_source_500_is_502_code_604(self) -> None:
        """An origin failing with 500 is our upstream's fault: 502 with code 604."""
        self.origin.statuses[b"/broken"] = 500
        answer = self.register(f"{ORIGIN}/broken")
        self.assertEqual((answer.status, answer.code), (502, 604))

    def test_silent_source_fails_registration_after_the_source_timeout(self) -> None:
        """An origin that never answers fails the registration with 502/604 after 30 s."""
        self.origin.silent.add(b"/silent")
        d = self.start("POST", "/peer/registry", json=registration(f"{ORIGIN}/silent"))
        self.pump()
        self.assertNoResult(d)
        self.clock.advance(30)
        self.pump()
        answer = self.successResultOf(d)
        self.assertEqual((answer.status, answer.code), (502, 604))

    def test_silent_source_reason_names_the_timeout(self) -> None:
        """The reason of a source timeout says it timed out, not that the connection closed."""
        self.origin.silent.add(b"/silent")
        d = self.start("POST", "/peer/registry", json=registration(f"{ORIGIN}/silent"))
        self.pump()
        self.clock.advance(30)
        self.pump()
        self.assertIn("did not answer within 30s", self.successResultOf(d).json()["msg"])


class CacheRevalidationTests(SupernodeApiTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.url = self.serve(b"/file", TWO)
        self.origin.etags[b"/file"] = b'"v1"'
        self.tid = self.register_ok(self.url)
        self.start_supernode()  # a restart over the same --home

    def test_restarted_supernode_revalidates_with_if_none_match(self) -> None:
        """The cached entry's ETag goes to the origin as If-None-Match."""
        self.register_ok(self.url)
        self.assertEqual(self.origin.headers(1, b"if-none-match"), [b'"v1"'])

    def test_restarted_supernode_reuses_its_cache_on_304(self) -> None:
        """On 304 the stored digests are offered and the data file is kept."""
        self.register_ok(self.url)
        digests = [p["pieceDigest"] for p in self.pull(self.tid).data]
        self.assertEqual(digests, [sha256(payload(TWO)[:P]), sha256(payload(TWO)[P:])])

    def test_restarted_supernode_refetches_when_the_etag_changed(self) -> None:
        """New bytes under a new ETag are fetched again, not served from the old cache."""
        self.origin.files[b"/file"] = payload(TWO, seed=1)
        self.origin.etags[b"/file"] = b'"v2"'
        self.register_ok(self.url)
        digests = [p["pieceDigest"] for p in self.pull(self.tid).data]
        self.assertEqual(digests, [sha256(payload(TWO, seed=1)[:P]), sha256(payload(TWO, seed=1)[P:])])


class PullTests(SupernodeApiTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.tid = self.register_ok(self.serve(b"/five", FIVE), cid="peer-1")

    def test_pull_of_unknown_task_is_404_code_502(self) -> None:
        """A well-formed but unknown taskId is 404 with code 502."""
        answer = self.pull("f" * 64)
        self.assertEqual((answer.status, answer.code), (404, 502))

    def test_pull_with_malformed_task_id_is_400(self) -> None:
        """A taskId that is not 64 hex digits is 400."""
        answer = self.pull("../etc")
        self.assertEqual((answer.status, answer.code), (400, 501))

    def test_pull_of_unknown_cid_is_404(self) -> None:
        """A cid that never registered for the task is 404."""
        answer = self.pull(self.tid, "stranger")
        self.assertEqual((answer.status, answer.code), (404, 502))

    def test_pull_without_src_cid_is_400(self) -> None:
        """srcCid is required."""
        answer = self.call("GET", "/peer/task", params={"taskId": self.tid})
        self.assertEqual((answer.status, answer.code), (400, 501))

    def test_pull_offers_the_first_four_pieces(self) -> None:
        """The first pull answers 601 with pieces 0-3 (at most 4 run per cid)."""
        self.assertEqual(self.pieces(self.pull(self.tid)), [0, 1, 2, 3])

    def test_pulled_pieces_carry_range_size_and_digest(self) -> None:
        """Each piece has its byte range, the piece size and the sha256 of its bytes."""
        data = payload(FIVE)
        got = [(p["range"], p["pieceSize"], p["pieceDigest"]) for p in self.pull(self.tid).data]
        want = [(f"{n * P}-{(n + 1) * P - 1}", P, sha256(data[n * P : (n + 1) * P])) for n in range(4)]
        self.assertEqual(got, want)

    def test_pulled_pieces_point_at_the_cdn(self) -> None:
        """Each piece comes from the CDN: cdnnode: cid, advertised ip, CDN port, data path."""
        piece = self.pull(self.tid).data[0]
        self.assertEqual(
            (piece["cid"].startswith("cdnnode:"), piece["peerIp"], piece["peerPort"], piece["path"]),
            (True, CDN_IP, CDN_PORT, f"/download/{self.tid[:3]}/{self.tid}"),  # the key travels as a header
        )

    def test_pulled_piece_is_served_by_the_cdn_with_its_digest(self) -> None:
        """The CDN resource serves the pulled path and range, and its bytes match the pieceDigest."""
        piece = self.pull(self.tid).data[1]
        request = DummyRequest(piece["path"].encode().lstrip(b"/").split(b"/"))
        request.requestHeaders.setRawHeaders(codes.TASK_KEY_HEADER, [self.tasks.key_for(self.tid)])
        request.requestHeaders.setRawHeaders(b"range", [f"bytes={piece['range']}".encode()])
        child = getChildForRequest(CdnFiles(self.cache, keys=self.tasks.key_for), request)
        self.assertIs(child.render(request), NOT_DONE_YET)
        self.assertEqual((request.responseCode, sha256(b"".join(request.written))), (206, piece["pieceDigest"]))

    def test_cdn_serves_nothing_without_the_tasks_key(self) -> None:
        """Knowing (or computing) a task id is not enough: without its key, or with another, the CDN says 404."""
        piece = self.pull(self.tid).data[0]
        key = self.tasks.key_for(self.tid)
        for headers in ({}, {codes.TASK_KEY_HEADER: ["0" * 32]}, {codes.TASK_KEY_HEADER: ["\u00e9"]}):
            request = DummyRequest(piece["path"].encode().lstrip(b"/").split(b"/"))
            for name, values in headers.items():
                request.requestHeaders.setRawHeaders(name, values)
            request.args = {b"k": [key.encode()]}  # the old query form unlocks nothing: keys stay out of URLs
            child = getChildForRequest(CdnFiles(self.cache, keys=self.tasks.key_for), request)
            child.render(request)
            self.assertEqual(request.responseCode, 404, headers)

    def test_pull_without_advertise_ip_names_the_address_it_was_reached_on(self) -> None:
        """Without --advertise-ip, peerIp is the host address of the API request."""
        self.start_supernode(advertise_ip=None)
        tid = self.register_ok(self.serve(b"/file", SMALL))
        self.assertEqual(self.pull(tid).data[0]["peerIp"], "127.0.0.1")

    def test_pull_after_reports_offers_the_next_pieces(self) -> None:
        """Once pieces 0-3 are reported, the next pull offers piece 4 with its short range."""
        for piece in self.pull(self.tid).data:
            self.report(self.tid, piece["range"])
        answer = self.pull(self.tid)
        self.assertEqual([(p["pieceNum"], p["range"]) for p in answer.data], [(4, f"{4 * P}-{FIVE - 1}")])

    def test_pull_after_every_piece_is_reported_is_600_with_the_file_length(self) -> None:
        """When the peer has every piece the pull answers 600 and the file length."""
        for _ in range(2):
            for piece in self.pull(self.tid).data:
                self.report(self.tid, piece["range"])
        answer = self.pull(self.tid)
        self.assertEqual((answer.status, answer.code, answer.data["fileLength"]), (200, 600, FIVE))

    def test_pull_reporting_a_success_in_its_query_frees_a_slot(self) -> None:
        """Dragonfly's range=..&result=501 in the pull counts as a piece/suc."""
        self.pull(self.tid)
        answer = self.pull(self.tid, range=f"0-{P - 1}", result="501")
        self.assertEqual(self.pieces(answer), [4])

    def test_pull_reporting_a_failure_in_its_query_reoffers_the_piece(self) -> None:
        """range=..&result=500 in the pull makes that piece offered again."""
        self.pull(self.tid)
        answer = self.pull(self.tid, range=f"{P}-{2 * P - 1}", result="500")
        self.assertEqual(self.pieces(answer), [1])

    def test_second_peer_gets_no_piece_the_cdn_is_sending_to_the_first(self) -> None:
        """While the CDN sends pieces 0-3 to peer-1 (its 4 slots), peer-2's pull is held, then 602."""
        self.pull(self.tid)
        self.register_ok(f"{ORIGIN}/five", cid="peer-2", ip="192.0.2.2", port=15002)
        d = self.start_pull(self.tid, "peer-2")
        self.pump()
        self.assertNoResult(d)
        self.clock.advance(POLL_TIMEOUT)
        self.pump()
        answer = self.successResultOf(d)
        self.assertEqual((answer.status, answer.code), (200, 602))

    def test_second_peer_gets_a_reported_piece_from_the_first_peer(self) -> None:
        """Once peer-1 reports piece 0, peer-2's held pull gets it from peer-1, and piece 4 from the CDN."""
        first = self.pull(self.tid).data
        self.register_ok(f"{ORIGIN}/five", cid="peer-2", ip="192.0.2.2", port=15002)
        d = self.start_pull(self.tid, "peer-2")
        self.pump()
        self.assertNoResult(d)
        self.report(self.tid, first[0]["range"])
        got = {p["pieceNum"]: (p["cid"], p["peerIp"], p["peerPort"], p["path"]) for p in self.successResultOf(d).data}
        self.assertEqual(got, {
            0: ("peer-1", "192.0.2.1", 15001, f"/peer/file/{self.tid}"),
            4: (f"cdnnode:{CDN_IP}~{self.tid}", CDN_IP, CDN_PORT,
                f"/download/{self.tid[:3]}/{self.tid}"),
        })

    def test_empty_file_pull_is_600_at_once(self) -> None:
        """An empty source file is finished right away with fileLength 0."""
        tid = self.register_ok(self.serve(b"/empty", 0))
        answer = self.pull(tid)
        self.assertEqual((answer.code, answer.data["fileLength"]), (600, 0))


class PeerSourceTests(SupernodeApiTestCase):
    """Verified pieces make a peer a source; failures and departures take it off."""

    def setUp(self) -> None:
        super().setUp()
        self.url = self.serve(b"/two", TWO)
        self.tid = self.register_ok(self.url)
        self.offered = self.pull(self.tid).data  # pieces 0 and 1, from the CDN

    def join(self, cid: str, n: int) -> None:
        self.register_ok(self.url, cid=cid, ip=f"192.0.2.{n}", port=15000 + n)

    def sources(self, answer: Answer) -> dict[int, str]:
        self.assertEqual((answer.status, answer.code), (200, 601), answer)
        return {p["pieceNum"]: p["cid"] for p in answer.data}

    def test_piece_suc_makes_the_peer_a_source_for_others(self) -> None:
        """After peer-1 reports piece 0, peer-2 is sent to peer-1's uploader for it (piece 1 is in flight)."""
        self.report(self.tid, self.offered[0]["range"])
        self.join("peer-2", 2)
        answer = self.pull(self.tid, "peer-2")
        self.assertEqual((answer.status, answer.code, answer.data), (200, 601, [{
            "pieceNum": 0,
            "range": f"0-{P - 1}",
            "pieceSize": P,
            "pieceDigest": sha256(payload(TWO)[:P]),
            "cid": "peer-1",
            "peerIp": "192.0.2.1",
            "peerPort": 15001,
            "path": f"/peer/file/{self.tid}",
        }]))

    def test_peer_that_serves_nothing_is_not_a_source(self) -> None:
        """A peer registered with port 0 reports pieces but nobody is sent to it."""
        self.register_ok(self.url, cid="peer-0", ip="192.0.2.9", port=0)
        self.call("GET", "/peer/service/down", params={"taskId": self.tid, "cid": "peer-1"})
        for piece in self.pull(self.tid, "peer-0").data:
            self.report(self.tid, piece["range"], cid="peer-0")
        self.join("peer-2", 2)
        self.assertEqual(set(self.sources(self.pull(self.tid, "peer-2")).values()), {f"cdnnode:{CDN_IP}~{self.tid}"})

    def test_digest_mismatch_blacklists_the_source_for_the_reporter(self) -> None:
        """After peer-2 reports a digest mismatch from peer-1, it gets that piece from the CDN."""
        for piece in self.offered:
            self.report(self.tid, piece["range"])
        self.join("peer-2", 2)
        self.assertEqual(self.sources(self.pull(self.tid, "peer-2")), {0: "peer-1", 1: "peer-1"})
        self.report(self.tid, self.offered[0]["range"], cid="peer-2", ok=False)
        self.assertEqual(self.sources(self.pull(self.tid, "peer-2")), {0: f"cdnnode:{CDN_IP}~{self.tid}"})

    def test_digest_mismatch_does_not_blacklist_the_source_for_others(self) -> None:
        """One peer's digest mismatch from peer-1 does not keep a third peer away from peer-1."""
        for piece in self.offered:
            self.report(self.tid, piece["range"])
        self.join("peer-2", 2)
        self.pull(self.tid, "peer-2")
        self.report(self.tid, self.offered[0]["range"], cid="peer-2", ok=False)
        self.join("peer-3", 3)
        self.assertEqual(self.sources(self.pull(self.tid, "peer-3")), {0: "peer-1", 1: "peer-1"})

    def test_unreachable_source_is_offered_to_nobody(self) -> None:
        """"Unreachable" about peer-1 from two hosts takes it off for every peer; from one host, only for it."""
        for piece in self.offered:
            self.report(self.tid, piece["range"])
        cdn = {f"cdnnode:{CDN_IP}~{self.tid}"}
        for n, offered_to_others in ((2, {"peer-1"}), (3, cdn)):
            self.join(f"peer-{n}", n)
            self.pull(self.tid, f"peer-{n}")
            self.call("GET", "/peer/piece/error", params={
                "taskId": self.tid, "cid": f"peer-{n}", "range": self.offered[0]["range"], "kind": "unreachable",
            })
            self.join(f"peer-{n + 10}", n + 10)
            self.assertEqual(set(self.sources(self.pull(self.tid, f"peer-{n + 10}")).values()), offered_to_others)

    def test_write_error_blames_nobody(self) -> None:
        """A reporter's own "write" failure leaves peer-1 its source for the retry."""
        for piece in self.offered:
            self.report(self.tid, piece["range"])
        self.join("peer-2", 2)
        self.pull(self.tid, "peer-2")
        self.call("GET", "/peer/piece/error", params={
            "taskId": self.tid, "cid": "peer-2", "range": self.offered[0]["range"], "kind": "write",
        })
        self.assertEqual(self.sources(self.pull(self.tid, "peer-2")), {0: "peer-1"})

    def test_service_down_peer_is_no_longer_offered(self) -> None:
        """After peer-1's service/down, pieces it held come from the CDN."""
        for piece in self.offered:
            self.report(self.tid, piece["range"])
        self.call("GET", "/peer/service/down", params={"taskId": self.tid, "cid": "peer-1"})
        self.join("peer-2", 2)
        self.assertEqual(
            self.sources(self.pull(self.tid, "peer-2")),
            {0: f"cdnnode:{CDN_IP}~{self.tid}", 1: f"cdnnode:{CDN_IP}~{self.tid}"},
        )

    def test_service_down_frees_the_cdn_for_a_held_pull(self) -> None:
        """A peer leaving with CDN pieces in flight wakes a waiting pull, which gets them."""
        self.join("peer-2", 2)
        d = self.start_pull(self.tid, "peer-2")
        self.pump()
        self.assertNoResult(d)
        self.call("GET", "/peer/service/down", params={"taskId": self.tid, "cid": "peer-1"})
        self.assertEqual(
            self.sources(self.successResultOf(d)),
            {0: f"cdnnode:{CDN_IP}~{self.tid}", 1: f"cdnnode:{CDN_IP}~{self.tid}"},
        )


class SweepTests(SupernodeApiTestCase):
    """TaskManager.sweep drops downloading peers silent for more than SILENCE seconds."""

    def setUp(self) -> None:
        super().setUp()
        self.url = self.serve(b"/five", FIVE)
        self.tid = self.register_ok(self.url)
        self.pull(self.tid)  # peer-1 runs pieces 0-3: the CDN's 4 slots

    def waiting_pull(self) -> Deferred[Answer]:
        """peer-2 registers now and pulls: held, since the CDN is busy with peer-1."""
        self.register_ok(self.url, cid="peer-2", ip="192.0.2.2", port=15002)
        d = self.start_pull(self.tid, "peer-2")
        self.pump()
        self.assertNoResult(d)
        return d

    def assertHungUp(self, held: Deferred[Answer]) -> None:
        """The cancelled pull failed on the client side; consume that failure.

        Left unconsumed, the failed Deferred stays reachable from this test's
        StubTreq (its MemoryReactorClock keeps the connector's factory, whose
        ``_onConnection`` is this very Deferred) until trial drops the test;
        the garbage collector then logs "Unhandled error in Deferred" into
        whichever later test it happens to run in.
        """
        self.failureResultOf(held, ResponseNeverReceived)

    def test_silent_peer_is_dropped_and_its_slots_go_to_a_waiting_pull(self) -> None:
        """Just over SILENCE after peer-1's last word, sweep drops it and peer-2's held pull gets 0-3 from the CDN."""
        self.clock.advance(SILENCE + 0.1)
        d = self.waiting_pull()
        self.tasks.sweep()
        self.pump()
        answer = self.successResultOf(d)
        self.assertEqual(
            [(p["pieceNum"], p["cid"]) for p in answer.data], [(n, f"cdnnode:{CDN_IP}~{self.tid}") for n in range(4)]
        )

    def test_swept_peer_pull_is_404(self) -> None:
        """A dropped peer that comes back is told it is no longer registered."""
        self.clock.advance(SILENCE + 0.1)
        self.tasks.sweep()
        answer = self.pull(self.tid)
        self.assertEqual((answer.status, answer.code), (404, 502))

    def test_peer_silent_for_exactly_silence_is_kept(self) -> None:
        """Silence must exceed SILENCE: at exactly SILENCE the peer stays and its CDN slots stay taken."""
        self.clock.advance(SILENCE)
        d = self.waiting_pull()
        self.tasks.sweep()
        self.pump()
        self.assertNoResult(d)
        self.assertIn("peer-1", self.tasks.task(self.tid).peers)

    def test_report_counts_as_a_word(self) -> None:
        """A piece/suc keeps a peer whose last pull ended more than SILENCE ago."""
        self.clock.advance(SILENCE - 1)
        self.report(self.tid, f"0-{P - 1}")
        self.clock.advance(SILENCE - 1)
        self.tasks.sweep()
        self.assertIn("peer-1", self.tasks.task(self.tid).peers)

    def test_peer_with_a_held_pull_is_not_swept(self) -> None:
        """A pull in flight is a sign of life, however long ago the peer last finished one."""
        self.assertGreater(POLL_TIMEOUT, 2)
        self.clock.advance(SILENCE - 1)
        held = self.start_pull(self.tid)  # peer-1 runs 4 pieces: this pull waits
        self.pump()
        self.clock.advance(2)
        self.tasks.sweep()
        self.assertNoResult(held)
        self.clock.advance(POLL_TIMEOUT)
        self.pump()
        self.assertEqual(self.successResultOf(held).code, 602)

    def test_peer_that_hung_up_on_a_held_pull_is_dropped_soon(self) -> None:
        """Closing a held pull (a killed peer) gets the peer dropped after HUNG_UP_GRACE, not SILENCE."""
        held = self.start_pull(self.tid)  # peer-1 runs 4 pieces: this pull waits
        self.pump()
        held.cancel()  # the peer's connection went away
        self.pump()
        self.assertHungUp(held)
        self.clock.advance(HUNG_UP_GRACE + 0.1)
        self.tasks.sweep()
        self.assertNotIn("peer-1", self.tasks.task(self.tid).peers)

    def test_peer_that_pulls_again_after_hanging_up_is_kept(self) -> None:
        """A new pull after a hang-up clears it: only silence counts then."""
        held = self.start_pull(self.tid)
        self.pump()
        held.cancel()
        self.pump()
        self.assertHungUp(held)
        again = self.start_pull(self.tid)
        self.pump()
        self.clock.advance(HUNG_UP_GRACE + 0.1)
        self.tasks.sweep()
        self.assertIn("peer-1", self.tasks.task(self.tid).peers)
        self.clock.advance(POLL_TIMEOUT)
        self.pump()
        self.assertEqual(self.successResultOf(again).code, 602)

    def finished_seed(self) -> str:
        """``seed`` fetched the one-piece /small and got 600; returns the task id."""
        url = self.serve(b"/small", SMALL)
        tid = self.register_ok(url, cid="seed")
        self.report(tid, self.pull(tid, "seed").data[0]["range"], cid="seed")
        self.assertEqual(self.pull(tid, "seed").code, 600)
        self.small_url = url
        return tid

    def sources_for_peer_2(self, tid: str) -> list[str]:
        self.register_ok(self.small_url, cid="peer-2", ip="192.0.2.2", port=15002)
        return [p["cid"] for p in self.pull(tid, "peer-2").data]

    def test_finished_peer_that_pulls_as_a_heartbeat_stays_a_source(self) -> None:
        """A finished peer that pulls (600) now and then stays a source for an hour."""
        tid = self.finished_seed()
        for _ in range(60):
            self.clock.advance(FINISHED_SILENCE / 2)
            self.assertEqual(self.pull(tid, "seed").code, 600)
            self.tasks.sweep()
        self.assertEqual(self.sources_for_peer_2(tid), ["seed"])

    def test_finished_peer_silent_for_finished_silence_is_dropped(self) -> None:
        """A finished peer that says nothing for longer than finished_silence is offered to nobody."""
        tid = self.finished_seed()
        self.clock.advance(FINISHED_SILENCE + 0.1)
        self.tasks.sweep()
        self.assertNotIn("seed", self.tasks.task(tid).peers)
        self.assertEqual(self.sources_for_peer_2(tid), [f"cdnnode:{CDN_IP}~{tid}"])


class LongPollTests(SupernodeApiTestCase):
    """Pulls that find nothing to do are held open."""

    def stream(self, length: int | None) -> str:
        """Register a task whose body the test writes; returns its task id."""
        self.origin.streams[b"/live"] = length
        return self.register_ok(f"{ORIGIN}/live")

    def test_pull_with_nothing_ready_is_held_open(self) -> None:
        """Before any piece is cached, the pull does not answer."""
        tid = self.stream(TWO)
        d = self.start_pull(tid)
        self.pump()
        self.assertNoResult(d)

    def test_held_pull_is_still_open_just_before_the_poll_timeout(self) -> None:
        """The pull is held for the whole poll timeout."""
        tid = self.stream(TWO)
        d = self.start_pull(tid)
        self.pump()
        self.clock.advance(POLL_TIMEOUT - 0.1)
        self.pump()
        self.assertNoResult(d)

    def test_held_pull_answers_602_at_the_poll_timeout(self) -> None:
        """When the poll timeout passes with nothing to do, the answer is 602."""
        tid = self.stream(TWO)
        d = self.start_pull(tid)
        self.pump()
        self.clock.advance(POLL_TIMEOUT)
        self.pump()
        answer = self.successResultOf(d)
        self.assertEqual((answer.status, answer.code), (200, 602))

    def test_held_pull_fires_when_a_piece_becomes_ready(self) -> None:
        """The pull answers as soon as the first piece is cached."""
        tid = self.stream(TWO)
        d = self.start_pull(tid)
        self.pump()
        self.origin.held[0].write(payload(TWO)[:P])
        self.pump()
        answer = self.successResultOf(d)
        self.assertEqual(
            [(p["pieceNum"], p["pieceDigest"]) for p in answer.data], [(0, sha256(payload(TWO)[:P]))]
        )

    def test_partial_piece_does_not_wake_a_held_pull(self) -> None:
        """Bytes short of a whole piece are not a piece yet."""
        tid = self.stream(TWO)
        d = self.start_pull(tid)
        self.pump()
        self.origin.held[0].write(payload(TWO)[: P - 1])
        self.pump()
        self.assertNoResult(d)

    def test_held_pull_fires_when_piece_suc_frees_a_slot(self) -> None:
        """With 4 pieces running and a 5th ready, a piece/suc wakes the held pull."""
        tid = self.register_ok(self.serve(b"/five", FIVE))
        first = self.pull(tid).data
        d = self.start_pull(tid)
        self.pump()
        self.assertNoResult(d)
        self.report(tid, first[0]["range"])
        self.assertEqual(self.pieces(self.successResultOf(d)), [4])

    def test_held_pull_fails_502_code_610_when_the_fetch_breaks(self) -> None:
        """If the origin drops the CDN fetch, the held pull answers 502 with code 610."""
        tid = self.stream(TWO)
        d = self.start_pull(tid)
        self.pump()
        self.origin.held[0].write(b"x" * 10)
        self.origin.held[0].transport.loseConnection()
        self.pump()
        answer = self.successResultOf(d)
        self.assertEqual((answer.status, answer.code), (502, 610))

    def test_stalled_fetch_fails_the_task_after_the_idle_timeout(self) -> None:
        """A CDN fetch that goes quiet for 30 s fails, and pulls say 502 code 610."""
        tid = self.stream(TWO)
        self.clock.advance(30)
        self.pump()
        answer = self.pull(tid)
        self.assertEqual((answer.status, answer.code), (502, 610))

    def test_unknown_length_source_last_piece_has_its_real_range(self) -> None:
        """A chunked (unknown-length) file's last piece is offered with its real, short range."""
        tid = self.stream(None)
        d = self.start_pull(tid)
        self.pump()
        self.origin.held[0].write(b"x" * 10)
        self.origin.held[0].finish()
        self.pump()
        self.assertEqual([p["range"] for p in self.successResultOf(d).data], ["0-9"])

    def test_unknown_length_source_finishes_with_its_length(self) -> None:
        """Once a chunked file is complete, the 600 answer carries its length."""
        tid = self.stream(None)
        self.origin.held[0].write(b"x" * 10)
        self.origin.held[0].finish()
        self.pump()
        self.report(tid, self.pull(tid).data[0]["range"])
        answer = self.pull(tid)
        self.assertEqual((answer.code, answer.data["fileLength"]), (600, 10))


class ReportTests(SupernodeApiTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.tid = self.register_ok(self.serve(b"/two", TWO))
        self.offered = self.pull(self.tid).data

    def test_piece_suc_answers_611(self) -> None:
        """A piece/suc for an assigned piece is recorded with code 611."""
        answer = self.report(self.tid, self.offered[0]["range"])
        self.assertEqual((answer.status, answer.code), (200, 611))

    def test_piece_suc_accepts_range_for_piece_range(self) -> None:
        """``range`` is accepted as the spelling of ``pieceRange``."""
        params = {"taskId": self.tid, "cid": "peer-1", "range": self.offered[0]["range"]}
        self.assertEqual(self.call("GET", "/peer/piece/suc", params=params).code, 611)

    def test_piece_suc_for_an_unassigned_piece_is_400(self) -> None:
        """A peer cannot claim a piece it was never given."""
        self.register_ok(f"{ORIGIN}/two", cid="peer-2")
        answer = self.report(self.tid, f"0-{P - 1}", cid="peer-2")
        self.assertEqual((answer.status, answer.code), (400, 501))

    def test_piece_suc_with_a_misaligned_range_is_400(self) -> None:
        """A range that is not one piece is refused."""
        answer = self.report(self.tid, "1-100")
        self.assertEqual((answer.status, answer.code), (400, 501))

    def test_piece_suc_for_an_unknown_task_is_404(self) -> None:
        """Reports on unknown tasks are 404 with code 502."""
        answer = self.report("e" * 64, f"0-{P - 1}")
        self.assertEqual((answer.status, answer.code), (404, 502))

    def test_piece_error_answers_611(self) -> None:
        """A piece/error is recorded with code 611."""
        answer = self.report(self.tid, self.offered[0]["range"], ok=False)
        self.assertEqual((answer.status, answer.code), (200, 611))

    def test_piece_error_makes_the_piece_offered_again(self) -> None:
        """After piece/error on piece 0 (and success on 1) the next pull offers piece 0."""
        self.report(self.tid, self.offered[0]["range"], ok=False)
        self.report(self.tid, self.offered[1]["range"])
        self.assertEqual(self.pieces(self.pull(self.tid)), [0])

    def test_piece_error_accepts_dragonfly_spellings(self) -> None:
        """srcCid and errorType are accepted for cid and kind."""
        params = {"taskId": self.tid, "srcCid": "peer-1", "range": self.offered[0]["range"], "errorType": "x"}
        self.call("GET", "/peer/piece/error", params=params)
        self.report(self.tid, self.offered[1]["range"])
        self.assertEqual(self.pieces(self.pull(self.tid)), [0])

    def test_service_down_answers_612(self) -> None:
        """/peer/service/down answers code 612."""
        answer = self.call("GET", "/peer/service/down", params={"taskId": self.tid, "cid": "peer-1"})
        self.assertEqual((answer.status, answer.code), (200, 612))

    def test_service_down_removes_the_cid(self) -> None:
        """After /peer/service/down the cid's next pull is 404."""
        self.call("GET", "/peer/service/down", params={"taskId": self.tid, "cid": "peer-1"})
        answer = self.pull(self.tid)
        self.assertEqual((answer.status, answer.code), (404, 502))

    def test_service_down_of_an_unknown_cid_is_404(self) -> None:
        """Taking down a cid that is not there is 404."""
        answer = self.call("GET", "/peer/service/down", params={"taskId": self.tid, "cid": "stranger"})
        self.assertEqual((answer.status, answer.code), (404, 502))


class ServiceRouteTests(SupernodeApiTestCase):
    def test_ping_is_ok(self) -> None:
        """/_ping answers OK in plain text."""
        answer = self.call("GET", "/_ping")
        self.assertEqual(
            (answer.status, answer.body, answer.headers.getRawHeaders(b"content-type")),
            (200, b"OK", [b"text/plain"]),
        )

    def test_version_is_json(self) -> None:
        """/version answers the dfly version in the envelope."""
        answer = self.call("GET", "/version")
        self.assertEqual((answer.status, answer.code, answer.data["version"]), (200, 200, dfly.__version__))

    def test_unknown_route_is_404_json(self) -> None:
        """An unknown path gets a JSON 404."""
        answer = self.call("GET", "/no/such/thing")
        self.assertEqual((answer.status, answer.code), (404, 501))

    def test_wrong_method_is_405_json(self) -> None:
        """GET on the POST-only registry is a JSON 405."""
        answer = self.call("GET", "/peer/registry")
        self.assertEqual((answer.status, answer.code), (405, 501))


class ReportNextTests(SupernodeApiTestCase):
    """dfly's peers report with ``next=1``: the answer carries their next pieces, one request per report."""

    def setUp(self) -> None:
        super().setUp()
        self.tid = self.register_ok(self.serve(b"/five", FIVE))
        self.first = self.pull(self.tid).data  # pieces 0-3: every slot of peer-1 is full

    def report_next(self, piece_range: str, ok: bool = True, **params: str) -> Answer:
        path = "/peer/piece/suc" if ok else "/peer/piece/error"
        query = {"taskId": self.tid, "cid": "peer-1", "next": "1", **params}
        query["pieceRange" if ok else "range"] = piece_range
        if not ok:
            query.setdefault("kind", "digest mismatch")
        return self.call("GET", path, params=query)

    def test_success_answers_606_with_the_next_piece(self) -> None:
        answer = self.report_next(self.first[0]["range"])
        self.assertEqual((answer.status, answer.code), (200, 611))
        self.assertEqual([p["pieceNum"] for p in answer.data], [4])
        self.assertEqual(set(answer.data[0]), {"pieceNum", "range", "pieceSize", "pieceDigest", "cid", "peerIp",
                                               "peerPort", "path"})

    def test_pieces_in_the_answer_are_assigned(self) -> None:
        """The piece handed out in the answer is running: no pull gets it again."""
        self.report_next(self.first[0]["range"])
        self.assertEqual(self.tasks.task(self.tid).peers["peer-1"].running.keys(), {1, 2, 3, 4})
        d = self.start_pull(self.tid)
        self.pump()
        self.assertNoResult(d)  # slots full again: held, nothing to hand out

    def test_held_pull_stays_held_and_is_not_woken(self) -> None:
        d = self.start_pull(self.tid)
        self.pump()
        before = self.tasks.counters.wakeups
        self.report_next(self.first[0]["range"])
        self.assertNoResult(d)
        self.assertEqual(self.tasks.counters.wakeups, before)

    def test_held_pull_is_refiled_hungry_when_nothing_is_left_to_take(self) -> None:
        """Piece 4 taken, another report frees a slot with nothing left: the held pull waits hungry, unanswered."""
        d = self.start_pull(self.tid)
        self.pump()
        self.report_next(self.first[0]["range"])
        answer = self.report_next(self.first[1]["range"])
        self.assertEqual(answer.data, [])
        self.assertNoResult(d)
        queue = self.tasks.task(self.tid).queue
        self.assertIn("peer-1", queue._hungry)

    def test_last_piece_makes_the_held_pull_answer_600(self) -> None:
        pieces = [p["range"] for p in self.first]
        pieces += [p["range"] for p in self.report_next(pieces[0]).data]
        d = self.start_pull(self.tid)
        self.pump()
        for piece_range in pieces[1:]:
            self.assertNoResult(d)
            self.assertEqual(self.report_next(piece_range).data, [])
        answer = self.successResultOf(d)
        self.assertEqual((answer.code, answer.data["pieceCount"]), (600, 5))

    def test_error_report_answers_with_the_next_pieces_from_another_source(self) -> None:
        failed = self.first[0]
        answer = self.report_next(failed["range"], ok=False, dstCid=failed["cid"])
        self.assertEqual(answer.code, 611)
        self.assertTrue(answer.data)
        self.assertLessEqual({p["pieceNum"] for p in answer.data}, {0, 4})

    def test_without_next_the_held_pull_gets_the_pieces(self) -> None:
        """Dragonfly's clients: no data in the report's answer; the held pull is woken with piece 4."""
        d = self.start_pull(self.tid)
        self.pump()
        answer = self.report(self.tid, self.first[0]["range"])
        self.assertNotIn("data", answer.json())
        self.assertEqual(self.pieces(self.successResultOf(d)), [4])

    def test_bad_next_is_400_json(self) -> None:
        for value in ("2", "yes"):
            answer = self.report_next(self.first[0]["range"], next=value)
            self.assertEqual((answer.status, answer.code), (400, 501), value)

    def test_one_report_wakes_a_constant_number_of_pulls_among_200_held(self) -> None:
        """200 peers each hold a pull; one next=1 report wakes at most what it frees: the new holder's
        spare uploads (at most maxUploads) and the source's slot (one), never the reporter's own pull."""
        for n in range(2, 202):
            cid = f"peer-{n}"
            self.register_ok(self.serve(b"/five", FIVE), cid=cid, ip=f"192.0.2.{n % 250}", port=15000 + n)
            for _ in range(2):  # the first may be answered (601) or held; the second is held
                self.start_pull(self.tid, cid)
                self.pump()
        self.assertGreaterEqual(self.tasks.held_pulls(), 200)
        before = self.tasks.counters.wakeups
        self.report_next(self.first[0]["range"])
        self.assertLessEqual(self.tasks.counters.wakeups - before, SchedulerPolicy().max_uploads + 1)


class PullWaitTests(SupernodeApiTestCase):
    """``wait=SECONDS``: the client's own hold budget."""

    def setUp(self) -> None:
        super().setUp()
        self.origin.streams[b"/live"] = TWO
        self.tid = self.register_ok(f"{ORIGIN}/live")

    def test_held_pull_answers_602_after_its_own_wait(self) -> None:
        d = self.start_pull(self.tid, wait="1.5")
        self.pump()
        self.clock.advance(1.4)
        self.pump()
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.pump()
        self.assertEqual(self.successResultOf(d).code, 602)

    def test_wait_longer_than_poll_timeout_is_honoured(self) -> None:
        d = self.start_pull(self.tid, wait="30")
        self.pump()
        self.clock.advance(POLL_TIMEOUT + 1)
        self.pump()
        self.assertNoResult(d)
        self.clock.advance(30)
        self.pump()
        self.assertEqual(self.successResultOf(d).code, 602)

    def test_wait_zero_answers_at_once(self) -> None:
        self.assertEqual(self.pull(self.tid, wait="0").code, 602)

    def test_bad_wait_is_400_json(self) -> None:
        for value in ("abc", "-1", "61", "nan", "inf"):
            answer = self.pull(self.tid, wait=value)
            self.assertEqual((answer.status, answer.code), (400, 501), value)
            self.assertIn("wait", answer.json()["msg"])


class FastRouteTests(SupernodeApiTestCase):
    """The routes served outside klein answer like the rest of the API."""

    def test_post_to_a_pull_is_405_json(self) -> None:
        answer = self.call("POST", "/peer/task", params={"taskId": "a" * 64, "srcCid": "x"})
        self.assertEqual((answer.status, answer.code), (405, 501))
        self.assertEqual(answer.headers.getRawHeaders(b"allow"), [b"GET"])

    def test_unexpected_error_is_a_logged_500_json(self) -> None:
        def broken(request: Any) -> bytes:
            raise RuntimeError("boom")

        def later(request: Any) -> Deferred[bytes]:
            d: Deferred[bytes] = Deferred()
            self.clock.callLater(1, d.errback, RuntimeError("late boom"))
            return d

        http = StubTreq(FastRoutes({b"/now": broken, b"/later": later}, Resource()))
        for path, text in ((b"/now", "boom"), (b"/later", "late boom")):
            d = http.get("http://x.test" + path.decode())
            http.flush()
            self.clock.advance(1)
            http.flush()
            response = self.successResultOf(d)
            body = json.loads(self.successResultOf(treq.content(response)))
            self.assertEqual((response.code, body["code"], body["msg"]), (500, 500, "internal error"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_other_paths_still_reach_klein(self) -> None:
        answer = self.call("GET", "/version")
        self.assertEqual((answer.status, answer.json()["data"]["version"]), (200, dfly.__version__))
        self.assertEqual(self.call("GET", "/peer/task/").status, 404)

    def test_client_leaving_a_held_pull_cancels_it(self) -> None:
        """The held pull lets go at once (the peer is marked hung up) and nothing is written after."""
        self.origin.streams[b"/live"] = TWO
        tid = self.register_ok(f"{ORIGIN}/live")
        d = self.start_pull(tid)
        self.pump()
        queue = self.tasks.task(tid).queue
        self.assertEqual(len(queue), 1)
        d.cancel()
        self.pump()
        self.assertEqual(len(queue), 0)
        self.assertTrue(self.tasks.task(tid).peers["peer-1"].hung_up)
        self.failureResultOf(d)
