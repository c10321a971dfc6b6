"""A bounded fuzz of every HTTP port (issue 11, Tests): hostile requests, then a real download.

Each test starts the real services on 127.0.0.1 port 0 (an origin, a
supernode, a peer daemon that has downloaded a file, and for the mirror
test a fake registry and a dfdaemon), sends a few hundred requests that
Hypothesis built to one port over raw TCP (`tests.loopback.RawClient`, so
malformed requests really reach the server), and checks:

- every answer's status is below 500, except the 5xx that ``docs/api.rst``
  and ``docs/dfdaemon.rst`` document (the supernode's 502 for a source it
  could not reach, its 503 for a limit; dfdaemon's 502/504 with a reason);
  a 500 is never allowed; a connection the server closes without an answer
  (a request line or header past Twisted's limits) is fine;
- a 4xx on a port that speaks JSON (register API, peer local API) is the
  ``{"code", "msg"}`` envelope, unless it is Twisted's own bare ``400`` for
  a request it could not parse; the uploader's and the CDN's 416 carry
  ``Content-Range: bytes */<length>``;
- a request the server has whole (framed correctly or not) is answered, or
  its connection closed, within `ANSWER_WITHIN`;
- no event logged with a failure, at level critical, or reading
  "Traceback" / "Unhandled Error", nothing in ``flushLoggedErrors``, and no
  "Traceback" in the services' own log files;
- memory flat: the process's resident set grows by less than `RSS_GROWTH`
  over the second half of the requests, the open file descriptors by at
  most `FD_SLACK`, and the services' state stays bounded (tasks within
  ``max_tasks``, no upload or download left running);
- afterwards a real download through the fuzzed port still works, its
  sha256 checked.

How Hypothesis meets trial: ``@given`` tests are synchronous and the
services need the running reactor, so Hypothesis only *builds* requests.
`draw_requests` runs a ``@given``-decorated inner function (``max_examples``
examples, ``derandomize=True``, no database, generation phase only) that
appends each drawn request's bytes to a list; the async test then sends
the list.  Hypothesis cannot shrink a failure this way, so a failure
message quotes the offending request's bytes, and ``derandomize`` makes
every run send the same requests.

Nothing leaves loopback: every service is built on a reactor whose name
resolver is `tests.loopback.LoopbackNames` (names resolve to nothing, IP
literals other than loopback too), and the supernode's ``sources`` allow
127.0.0.1 only (it dials IP literals without a lookup).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import urllib.parse
from typing import Any, Callable, Iterable

import attrs
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.web import server

from dfly import codes
from dfly.config import SupernodeFileConfig
from dfly.peer.engine import DownloadRequest, DownloadResult
from dfly.peer.hostmeta import TOKEN_HEADER
from dfly.peer.options import PeerConfig
from dfly.peer.tap import PeerParts
from dfly.peer.tap import build_service as build_peer
from dfly.pieces import MiB
from dfly.supernode.tap import SupernodeParts
from dfly.supernode.tap import build_service as build_supernode
from tests.loopback import ClosingFactory, LoopbackNames, RawClient, ResolvingReactor
from tests.test_dfdaemon import DfdaemonTestCase, dechunk, reactor, sha256
from tests.test_integration import Origin, sha256_file

#: How long a server may take to answer a request it has whole.
ANSWER_WITHIN = 10.0
#: How long a request the server cannot have whole (a body shorter than declared) is left open.
INCOMPLETE_WAIT = 0.2
#: Requests in flight at once.
CONCURRENCY = 24
#: Allowed growth of the resident set over the second half of a fuzz.
RSS_GROWTH = 30 * MiB
#: Allowed growth of the open file descriptors over the second half.
FD_SLACK = 8
#: The supernode's task limit during the fuzz.
MAX_TASKS = 40

#: Its small file: one piece, served by the CDN and the peer's uploader.
SMALL = 300_000


# --- what is sent -----------------------------------------------------------------------


@attrs.frozen
class Fuzzed:
    """One request as it goes on the wire."""

    data: bytes
    #: Whether the server has the whole request (it owes an answer), or waits for more body.
    complete: bool

    @property
    def method(self) -> bytes:
        return self.data.split(b" ", 1)[0]

    def __str__(self) -> str:
        shown = self.data if len(self.data) <= 600 else self.data[:600] + b"...(%d bytes)" % len(self.data)
        return repr(shown)


class Raw(str):
    """A JSON literal spliced into a body as it is (``NaN``, a 5000-digit number, unbalanced brackets)."""


def to_json(value: Any) -> str:
    """JSON text of ``value``, with `Raw` parts as written; keys and strings may hold any code point."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{to_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    return json.dumps(value)


def encode_body(value: Any) -> bytes:
    return to_json(value).encode("utf-8", "surrogatepass")


def chunked(body: bytes, final: bool = True) -> bytes:
    pieces = [body[i:i + 700] for i in range(0, len(body), 700)]
    out = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
    return out + (b"0\r\n\r\n" if final else b"")


def assemble(method: bytes, target: bytes, version: bytes, headers: list[tuple[bytes, bytes]],
             body: bytes | None, framing: str, host: bytes | None = b"127.0.0.1") -> Fuzzed:
    """The request's bytes; ``Connection: close`` first, so the server closes after its answer."""
    line = method + b" " + target + (b" " + version if version else b"")
    lines = [line, b"Connection: close"]
    if host is not None and not any(name.lower() == b"host" for name, _ in headers):  # two: twisted's 400
        lines.append(b"Host: " + host)
    lines += [name + b": " + value for name, value in headers]
    payload, complete = b"", True
    if body is not None:
        if framing == "length":
            lines.append(b"Content-Length: %d" % len(body))
            payload = body
        elif framing == "short":  # declares more than it sends: the server waits for the rest
            lines.append(b"Content-Length: %d" % (len(body) + 10))
            payload, complete = body, False
        elif framing == "long":  # the rest is read as the next request
            lines.append(b"Content-Length: %d" % (len(body) // 2))
            payload = body
        elif framing == "chunked":
            lines.append(b"Transfer-Encoding: chunked")
            payload = chunked(body)
        elif framing == "chunked-open":
            lines.append(b"Transfer-Encoding: chunked")
            payload, complete = chunked(body, final=False), False
        elif framing == "chunked-bad":
            lines.append(b"Transfer-Encoding: chunked")
            payload = b"zz\r\n" + body + b"\r\n0\r\n\r\n"
        elif framing == "both":
            lines += [b"Content-Length: %d" % len(body), b"Transfer-Encoding: chunked"]
            payload = chunked(body)
        elif framing == "bad-length":
            lines.append(b"Content-Length: -%d" % len(body))
            payload = body
        elif framing == "two-lengths":
            lines += [b"Content-Length: %d" % len(body), b"Content-Length: %d" % (len(body) + 1)]
            payload = body
        elif framing == "huge":
            lines.append(b"Content-Length: 100000000000000000000")
            payload, complete = body, False
        else:  # "bare": no framing header at all, the body is read as the next request
            payload = body
    return Fuzzed(b"\r\n".join(lines) + b"\r\n\r\n" + payload, complete)


# --- strategies -------------------------------------------------------------------------

ODD_METHODS = [b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT", b"get", b"G\x00T",
               b"FOO-BAR", b"\xc3\x89T", b"GET\tX", b"X" * 300, b"M-SEARCH"]
VERSIONS = [b"HTTP/1.1"] * 12 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b"", b"http/1.1", b"HTTP/9.9", b"HTTP/1.1 x"]
FRAMINGS = ["length"] * 12 + ["long", "chunked", "chunked", "chunked-bad", "both", "bad-length", "two-lengths",
                              "bare", "short", "chunked-open", "huge"]

HOSTILE_VALUES = [
    b"", b"-1", b"0", b"-0", b"1e999", b"nan", b"inf", b"-inf", b"Infinity", b"99999999999999999999999999",
    b"9" * 5000, b"0x10", b" 1", b"1 ", "\uff11".encode(), b"%00", b"\x00", b"../../../etc/passwd", b"a" * 3000,
    "\u00e9\u2603".encode(), b"\xff\xfe", b"1.5", b"true", b"null", b"[]", b"{}", b"1-", b"-", b"0-0", b"5-1",
    b"0-99999999999999999999", b"%ff", b"%", b"a&b=c", b"=", b"#", b"0--1", b"\r\nX-Injected: 1",
]
hostile_value = st.one_of(
    st.sampled_from(HOSTILE_VALUES),
    st.binary(max_size=12),
    st.text(max_size=12).map(lambda s: s.encode("utf-8")),
    st.integers().map(lambda n: str(n).encode()),
)


#: Hostile header values that twisted.web's parser lets through (most of the time: some bytes it refuses).
hostile_header_value = st.one_of(
    st.sampled_from([v for v in HOSTILE_VALUES if all(32 <= c < 127 for c in v)]),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20).map(lambda s: s.encode()),
    st.binary(max_size=8),
)


def values(good: Iterable[bytes], hostile: st.SearchStrategy[bytes] = hostile_value) -> st.SearchStrategy[bytes]:
    """A real value two times in three, a hostile one otherwise."""
    good = list(good)
    return st.one_of(st.sampled_from(good), st.sampled_from(good), hostile) if good else hostile


@st.composite
def query(draw: Any, params: dict[str, st.SearchStrategy[bytes]]) -> bytes:
    """Some of ``params`` (real names, drawn values), maybe repeated, maybe unknown keys, escaped or raw."""
    names = [name for name in sorted(params) if draw(st.integers(0, 3))]
    names += draw(st.lists(st.sampled_from(sorted(params)), max_size=2)) if params else []  # repeated
    pairs = [(name.encode(), draw(params[name])) for name in draw(st.permutations(names))]
    if draw(st.integers(0, 5)) == 0:
        pairs.append((draw(st.sampled_from([b"x", b"", b"taskId[]", "\u00e9".encode(), b"\x00"])), draw(hostile_value)))
    if draw(st.integers(0, 7)) == 0:  # raw: spaces, CR LF and '#' reach the request line as they are
        return b"&".join(k + b"=" + v for k, v in pairs)
    return b"&".join(urllib.parse.quote_from_bytes(k, safe=b"").encode() + b"="
                     + urllib.parse.quote_from_bytes(v, safe=b"").encode() for k, v in pairs)


@st.composite
def mutated(draw: Any, path: bytes) -> bytes:
    """``path`` with up to two hostile changes."""
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.integers(0, 11))
        at = draw(st.integers(0, len(path)))
        if kind == 0:  # every byte, or every second or third, percent-escaped
            step = draw(st.integers(1, 3))
            path = b"".join(b"%%%02X" % c if i % step == 0 else bytes([c]) for i, c in enumerate(path))
        elif kind == 1:
            path = path[:at] + draw(st.sampled_from([b"/..", b"/../..", b"/.", b"%2e%2e/", b"/%2e%2e%2f"])) + path[at:]
        elif kind == 2:
            path += b"/" + b"a" * draw(st.sampled_from([255, 4096, 9000, 20000]))
        elif kind == 3:
            path = path[:at] + draw(st.sampled_from([b"%00", b"\x00", b"%0d%0a", b"\t"])) + path[at:]
        elif kind == 4:
            text = draw(st.text(min_size=1, max_size=4)).encode()
            path = path[:at] + (text if draw(st.integers(0, 2)) == 0 else urllib.parse.quote_from_bytes(text).encode()) + path[at:]
        elif kind == 5:
            path = path[:at] + draw(st.sampled_from([b"\xff", b"%ff", b"%c3%28", b"\xc3\x28"])) + path[at:]
        elif kind == 6:
            path = path.replace(b"/", b"//", 1)
        elif kind == 7:
            path = path.upper()
        elif kind == 8:
            path = path[:at]
        elif kind == 9:
            path += draw(st.sampled_from([b"/", b"?", b"#x", b";x=1", b"%2f"]))
        elif kind == 10:
            path = draw(st.sampled_from([b"*", b"", b"?", b"http://127.0.0.1:1/", b"//", b"/%"]))
        else:
            path = path[:at] + path[at + 1:]
    return path


HOSTILE_HOSTS = st.sampled_from([b"", b"\xff\xfe", b"a" * 3000, b"a" * 64, b"a..b", b".", b"[::1", b"a:b:c",
                                 b"127.0.0.1:0", "\u00e9.example".encode(), b"xn--", b"-a.b", b"127.0.0.1:99999"])


def header_strategy(good: dict[bytes, list[bytes]]) -> st.SearchStrategy[tuple[bytes, bytes]]:
    """One header line: real names with real or hostile values, Range variants, odd names and values."""
    ranges = [b"bytes=0-99", b"bytes=0-", b"bytes=-10", b"bytes=10-5", b"bytes=0-99,100-199", b"bytes=abc",
              b"bytes=99999999999999999999-", b"bytes=-0", b"items=0-1", b"bytes= 0-1", b"bytes=0-1\x00",
              b"", b"bytes=-", b"bytes=0-1e3", b"bytes=%d-%d" % (SMALL - 1, SMALL + 5), b"bytes=%d-" % SMALL,
              b"bytes=0-%d" % (SMALL - 1), b"bytes=" + b"0" * 30 + b"1-2", b"bytes=0-" + b"9" * 5000,
              b"bytes=-99999999999999999999", b"bytes=1-1", b"bytes=%d-%d" % (4 * MiB, 4 * MiB + 1)]
    named = [(b"Range", st.sampled_from(ranges)),
             (b"Content-Type", st.sampled_from([b"application/json", b"text/plain", b"multipart/form-data; boundary=x",
                                                b"application/x-www-form-urlencoded", b"\xff", b""])),
             (b"Host", HOSTILE_HOSTS),
             (b"Expect", st.just(b"100-continue")),
             (b"Proxy-Authorization", st.sampled_from([b"Basic", b"Basic !!!", b"Basic dTpw", b"Bearer x"])),
             (b"Upgrade", st.sampled_from([b"h2c", b"websocket"])),
             (b"Accept-Encoding", st.sampled_from([b"gzip", b"*", b"\x00"])),
             (b"If-None-Match", st.sampled_from([b'"v1"', b"*", b"\xff"]))]
    named += [(name, values(vals, hostile_header_value)) for name, vals in good.items()]
    odd = st.tuples(st.sampled_from([b"X Bad", b"X:Y", b"", b"\xff", b"X-\x00", b" Leading", b"X-Long"]),
                    st.sampled_from([b"v", b"a" * 9000, b"\xff", b" folded\r\n continued", b""]))
    return st.one_of(*[st.tuples(st.just(name), strategy) for name, strategy in named], odd)


json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                        st.text(max_size=10))
json_any = st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
RAW_LITERALS = [Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1" + "0" * 5000), Raw("1e999"), Raw("-1e999"),
                Raw("[" * 40 + "]" * 40), Raw("[" * 5000), Raw('"\\ud800"'), Raw("18446744073709551616"),
                Raw("-9223372036854775809"), Raw("0.1e-999999")]
hostile_json = st.one_of(json_any, st.sampled_from(RAW_LITERALS))


@st.composite
def document(draw: Any, schema: dict[str, list[Any]], required: frozenset[str]) -> Any:
    """A real document (``required`` fields and some others, real values), then up to three fields
    made hostile or dropped, maybe extra fields, maybe wrapped in more nesting."""
    doc = {name: draw(st.sampled_from(good)) for name, good in schema.items() if name in required or draw(st.booleans())}
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        name = draw(st.sampled_from(sorted(schema)))
        if draw(st.integers(0, 3)) == 0:
            doc.pop(name, None)
        else:
            doc[name] = draw(hostile_json)
    if draw(st.integers(0, 3)) == 0:
        doc.update(draw(st.dictionaries(st.text(max_size=8), hostile_json, min_size=1, max_size=2)))
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from([[doc], {"body": doc}, [[[doc]]]]))
    return doc


def json_bodies(schema: dict[str, list[Any]], required: Iterable[str] = ()) -> st.SearchStrategy[bytes]:
    """Bodies from a real schema (see `document`), any JSON, or garbage."""
    documents = document(schema, frozenset(required)).map(encode_body)
    return st.one_of(
        documents, documents, documents, documents,
        hostile_json.map(encode_body),
        st.binary(max_size=200),
        st.sampled_from([b"", b"{", b"\xff\xfe{}", b"{}" * 10000, b"[" * 100000, b'{"url": "\xff"}',
                         b"\x00" * 100, b"null", b"1"]),
    )


@st.composite
def http_request(draw: Any, routes: st.SearchStrategy[tuple[bytes, bytes, dict[str, st.SearchStrategy[bytes]]]],
                 headers: st.SearchStrategy[tuple[bytes, bytes]], bodies: st.SearchStrategy[bytes],
                 essential: dict[bytes, list[bytes]] | None = None) -> Fuzzed:
    """A request of ``routes``, mostly well-formed with a few hostile parts, so most get past the parser.

    Each ``essential`` header (the key, the token) is sent seven times in
    eight, with a real value two times in three.
    """
    method, path, params = draw(routes)
    if draw(st.integers(0, 9)) == 0:
        method = draw(st.sampled_from(ODD_METHODS))
    target = draw(mutated(path)) if draw(st.integers(0, 2)) == 0 else path
    if params or draw(st.integers(0, 5)) == 0:
        target += b"?" + draw(query(params))
    body = None
    if method in (b"POST", b"PUT", b"PATCH") or draw(st.integers(0, 9)) == 0:
        body = draw(bodies)
    lines = [(name, draw(values(good + good, hostile_header_value)))
             for name, good in (essential or {}).items() if draw(st.integers(0, 7))]
    lines += draw(st.lists(headers, max_size=4)) if draw(st.booleans()) else []
    version = draw(st.sampled_from(VERSIONS)) if draw(st.integers(0, 4)) == 0 else b"HTTP/1.1"
    framing = draw(st.sampled_from(FRAMINGS)) if draw(st.integers(0, 2)) == 0 else "length"
    host = draw(st.one_of(st.none(), HOSTILE_HOSTS, HOSTILE_HOSTS)) if draw(st.integers(0, 4)) == 0 else b"127.0.0.1"
    return assemble(method, target, version, draw(st.permutations(lines)), body, framing, host)


def route(method: bytes, path: bytes | st.SearchStrategy[bytes], **params: st.SearchStrategy[bytes]
          ) -> st.SearchStrategy[tuple[bytes, bytes, dict[str, st.SearchStrategy[bytes]]]]:
    paths = path if isinstance(path, st.SearchStrategy) else st.just(path)
    return paths.map(lambda p: (method, p, params))


def draw_requests(strategy: st.SearchStrategy[Fuzzed], count: int) -> list[Fuzzed]:
    """``count`` requests drawn by Hypothesis, the same ones on every run (see the module docstring)."""
    drawn: list[Fuzzed] = []

    @settings(max_examples=count, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(request: Fuzzed) -> None:
        drawn.append(request)

    collect()
    return drawn


# --- what comes back --------------------------------------------------------------------


@attrs.frozen
class Answer:
    status: int
    headers: dict[bytes, list[bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes:
        return b",".join(self.headers.get(name, []))


_STATUS = re.compile(rb"\AHTTP/1\.[01] (\d{3})")


def parse_answer(received: bytes) -> Answer | None:
    """The first final answer in ``received`` (interim 100s skipped), or None when there is none."""
    while received:
        head, sep, rest = received.partition(b"\r\n\r\n")
        match = _STATUS.match(head)
        if match is None:
            raise ValueError("not an HTTP/1.x answer")
        status = int(match.group(1))
        if 100 <= status < 200:
            received = rest
            continue
        headers: dict[bytes, list[bytes]] = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        body = rest
        if b"chunked" in b",".join(headers.get(b"transfer-encoding", [])).lower():
            try:
                body = dechunk(rest)
            except (ValueError, IndexError):
                pass  # cut short: the checks below read what there is
        elif b"content-length" in headers:
            body = rest[:int(headers[b"content-length"][0])]
        return Answer(status, headers, body)
    return None


@attrs.frozen
class Contract:
    """What one port promises about its answers (docs/api.rst, docs/dfdaemon.rst)."""

    name: str
    #: Whether a 4xx to this request must be the JSON envelope.
    json_errors: Callable[[Fuzzed, Answer], bool]
    #: Whether this 5xx is one the port documents.
    documented_5xx: Callable[[Answer], bool] = lambda answer: False

    def problems(self, request: Fuzzed, received: bytes, timed_out: bool) -> list[str]:
        where = f"{self.name}: {request}"
        if timed_out and request.complete:
            return [f"{where}: no answer within {ANSWER_WITHIN:g}s (got {received[:200]!r})"]
        try:
            answer = parse_answer(received)
        except ValueError:
            return [f"{where}: answered {received[:300]!r}"]
        if answer is None:
            return []  # closed without an answer: fine for a request the server cannot parse
        out = []
        if answer.status >= 500 and not self.documented_5xx(answer):
            out.append(f"{where}: {answer.status} {answer.body[:300]!r}")
        if re.search(rb"\r\nHTTP/1\.[01] 500 ", received):  # the answer to bytes read as a second request
            out.append(f"{where}: a 500 behind the first answer: {received[:600]!r}")
        # twisted.web's own answers, before any resource: 400 for what it cannot parse, 405 for
        # ``GET *`` (asterisk-form is for OPTIONS); no body, no Content-Type.
        bare = not answer.headers.get(b"content-type") and not answer.body
        if (400 <= answer.status < 500 and request.method != b"HEAD" and not bare
                and self.json_errors(request, answer)):
            try:
                envelope = json.loads(answer.body)
                assert isinstance(envelope.get("code"), int) and isinstance(envelope.get("msg"), str)
            except (ValueError, AssertionError, AttributeError):
                out.append(f"{where}: a {answer.status} that is not the JSON envelope: {answer.body[:300]!r} "
                           f"({answer.header(b'content-type')!r})")
        if answer.status == 416 and not re.fullmatch(rb"bytes \*/\d+", answer.header(b"content-range")):
            out.append(f"{where}: a 416 without Content-Range bytes */<length>: {answer.headers!r}")
        if answer.status == 200 and answer.header(b"content-type") == b"application/x-ndjson":
            if b"internal error" in answer.body:
                out.append(f"{where}: the download stream ended in an internal error: {answer.body[-400:]!r}")
        return out


def envelope_code(answer: Answer) -> int | None:
    try:
        code = json.loads(answer.body).get("code")
    except (ValueError, AttributeError):
        return None
    return code if isinstance(code, int) else None


def is_uploader_answer(request: Fuzzed, answer: Answer) -> bool:
    """The uploader (``/peer/file/<id>``) answers its refusals in plain text, as docs/api.rst shows."""
    return answer.header(b"content-type").startswith(b"text/plain")


SUPERNODE_API = Contract(
    "register API",
    json_errors=lambda request, answer: True,
    # 502 (604/610): the source could not be reached; 503 (500): a limit is reached.
    documented_5xx=lambda answer: (answer.status, envelope_code(answer)) in {
        (502, codes.SOURCE_FAILED), (502, codes.SOURCE_ERROR), (503, codes.SYSTEM_ERROR)},
)
CDN = Contract("CDN", json_errors=lambda request, answer: False)
PEER = Contract("peer server", json_errors=lambda request, answer: not is_uploader_answer(request, answer))
DFDAEMON = Contract(
    "dfdaemon", json_errors=lambda request, answer: False,
    # A proxied host or tunnel target it could not reach (502), or one that did not answer (504), with the reason.
    documented_5xx=lambda answer: answer.status in (502, 504) and answer.body.startswith(b"dfdaemon: ")
    and b"internal error" not in answer.body,
)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- the services -----------------------------------------------------------------------


@attrs.frozen
class Known:
    """Real values the fuzz mixes in, so requests get past the first check."""

    task_id: str
    key: str
    cid: str
    secret: str
    piece_range: str
    api_port: int
    cdn_port: int
    peer_port: int
    token: str
    origin: str
    closed_port: int


class FuzzTestCase(DfdaemonTestCase):
    """An origin, a supernode, a peer daemon holding one downloaded file; a dfdaemon on demand."""

    timeout = 60

    def setUp(self) -> None:
        super().setUp()
        self.names = LoopbackNames()
        self.origin = Origin(os.path.join(self.work, "origin"))
        self.origin_root = f"http://127.0.0.1:{self.listen(server.Site(self.origin))}/"
        self.small_sha, _ = self.origin.put("small.bin", [os.urandom(SMALL)])
        self.origin.put("other.bin", [os.urandom(SMALL // 3)])
        self.out = os.path.join(self.work, "out")
        os.makedirs(self.out)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.signs = iter(range(1, 10**6))
        #: (engine, uploads) of every peer engine the fuzz may have set working.
        self.watched: list[tuple[Any, Any]] = []

    def dfdaemon_reactor(self) -> Any:
        return ResolvingReactor(reactor, self.names)

    async def start_supernode(self) -> SupernodeParts:
        config = SupernodeFileConfig(
            port=0, download_port=0, listen="127.0.0.1", home=self.supernode_home, advertise_ip="127.0.0.1",
            poll_timeout=0.3, max_tasks=MAX_TASKS, registration_rate=10_000, sources={"allow": ["127.0.0.1"]},
        )
        parts = build_supernode(config, ResolvingReactor(reactor, self.names))
        api_connections = parts.api.factory = ClosingFactory(parts.api.factory)
        cdn_connections = parts.cdn.factory = ClosingFactory(parts.cdn.factory)
        parts.service.startService()

        async def stop() -> None:
            if parts.service.running:
                await parts.service.stopService()
            await api_connections.close_all()
            await cdn_connections.close_all()

        self.addCleanup(stop)
        api: Any = await parts.api.listening
        await parts.cdn.listening
        self.nodes = (("127.0.0.1", api.getHost().port),)
        self.supernode = parts
        return parts

    async def start_peer(self, name: str) -> PeerParts:
        config = PeerConfig(home=os.path.join(self.work, name), port=0, listen="127.0.0.1", ip="127.0.0.1",
                            alivetime=0)
        parts = build_peer(config, ResolvingReactor(reactor, self.names), on_idle=lambda: None)
        connections = parts.listener.factory = ClosingFactory(parts.listener.factory)
        parts.service.startService()

        async def stop() -> None:
            if parts.service.running:
                await parts.service.stopService()
            await connections.close_all()

        self.addCleanup(stop)
        await parts.listener.listening
        self.watched.append((parts.engine, parts.uploads))
        return parts

    async def download(self, peer: PeerParts, name: str) -> tuple[DownloadRequest, DownloadResult]:
        n = next(self.signs)
        req = DownloadRequest(url=self.origin_root + name, output=os.path.join(self.out, f"real-{n}.bin"),
                              sign=f"{os.getpid()}-{n}.000", nodes=self.nodes, local_limit=0)
        return req, await peer.engine.download(req, lambda event: None)

    async def start_world(self) -> Known:
        """The supernode and a peer daemon that downloaded ``small.bin``; the values the fuzz mixes in."""
        supernode = await self.start_supernode()
        self.peer = await self.start_peer("peer")
        req, result = await self.download(self.peer, "small.bin")
        self.assertTrue(result.success, result.line())
        [task] = supernode.tasks.tasks.values()
        cid = f"127.0.0.1-{req.sign}"
        port = Factory.forProtocol(Protocol)
        closed = reactor.listenTCP(0, port, interface="127.0.0.1")
        closed_port = closed.getHost().port
        await closed.stopListening()
        assert supernode.cdn.port is not None and self.peer.listener.port is not None
        return Known(
            task_id=task.task_id, key=task.key, cid=cid, secret=task.peers[cid].secret,
            piece_range=f"0-{SMALL - 1}", api_port=self.nodes[0][1], cdn_port=supernode.cdn.port.getHost().port,
            peer_port=self.peer.listener.port.getHost().port, token=self.peer.daemon.token,
            origin=self.origin_root, closed_port=closed_port,
        )

    # sending and checking ------------------------------------------------------------

    async def exchange(self, port: int, request: Fuzzed) -> tuple[bytes, bool]:
        """What the server sent back until it closed (or we gave up), and whether we gave up."""
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        client.transport.write(request.data)
        timer = reactor.callLater(ANSWER_WITHIN if request.complete else INCOMPLETE_WAIT,
                                  client.transport.abortConnection)
        await client.closed
        if timer.active():
            timer.cancel()
            return client.received, False
        return client.received, True

    async def send_all(self, port: int, requests: list[Fuzzed], contract: Contract) -> list[str]:
        problems: list[str] = []
        semaphore = DeferredSemaphore(CONCURRENCY)

        async def one(request: Fuzzed) -> None:
            received, timed_out = await self.exchange(port, request)
            problems.extend(contract.problems(request, received, timed_out))

        await gatherResults([semaphore.run(lambda r=r: Deferred.fromCoroutine(one(r))) for r in requests])
        return problems

    async def fuzz(self, port: int, strategy: st.SearchStrategy[Fuzzed], count: int, contract: Contract,
                   state: Callable[[], list[str]] = lambda: [],
                   prepare: Callable[[list[Fuzzed]], list[Fuzzed]] = lambda requests: requests) -> None:
        """Send ``count`` drawn requests in two halves; every answer, the logs, memory and ``state`` checked."""
        requests = prepare(draw_requests(strategy, count))
        self.assertGreater(len(requests), count // 2, "Hypothesis drew too few requests")
        half = len(requests) // 2
        problems = await self.send_all(port, requests[:half], contract)
        gc.collect()
        rss_before, fds_before = rss(), open_fds()
        problems += await self.send_all(port, requests[half:], contract)
        await self.settle()
        gc.collect()
        rss_growth, fds_growth = rss() - rss_before, open_fds() - fds_before
        problems += state() + self.tracebacks()
        if rss_growth >= RSS_GROWTH:
            problems.append(f"the resident set grew {rss_growth / MiB:.1f} MiB over the second half")
        if fds_growth > FD_SLACK:
            problems.append(f"{fds_growth} more open files after the second half")
        if problems:
            self.fail(f"{len(problems)} problems in {len(requests)} requests:\n\n" + "\n\n".join(problems[:8]))

    async def settle(self) -> None:
        """Wait (briefly) until no download or upload the fuzz started still runs."""
        deadline = reactor.seconds() + ANSWER_WITHIN
        while any(engine.active or uploads.active for engine, uploads in self.watched):
            if reactor.seconds() > deadline:
                running = [(engine.active, uploads.active) for engine, uploads in self.watched]
                self.fail(f"still running after the fuzz (downloads, uploads): {running}")
            await Deferred.fromCoroutine(_sleep(0.05))

    def tracebacks(self) -> list[str]:
        """Failures, critical events and tracebacks logged, in events and in the services' log files."""
        bad = [f"logged: {formatEvent(e)}" + (e["log_failure"].getTraceback()[-1500:] if e.get("log_failure") else "")
               for e in self.events
               if e.get("log_failure") is not None or e.get("log_level") == LogLevel.critical
               or re.search("Traceback|Unhandled Error", formatEvent(e) or "")]
        bad += [f"flushLoggedErrors: {f.getTraceback()[-1500:]}" for f in self.flushLoggedErrors()]
        for root, _, files in os.walk(self.work):
            for name in files:
                if name.endswith(".log"):
                    with open(os.path.join(root, name), errors="replace") as f:
                        if "Traceback" in f.read():
                            bad.append(f"a traceback in {os.path.join(root, name)}")
        return bad

    def supernode_state(self) -> list[str]:
        tasks = self.supernode.tasks.tasks
        if len(tasks) > MAX_TASKS:
            return [f"{len(tasks)} tasks, more than max_tasks {MAX_TASKS}"]
        return []

    async def assertStillDownloads(self) -> None:
        """A second peer daemon downloads a file the fuzz never named, and the held one: right bytes."""
        other = await self.start_peer("after")
        after_sha, _ = self.origin.put("after.bin", [os.urandom(SMALL)])
        for name, sha in (("after.bin", after_sha), ("small.bin", self.small_sha)):
            req, result = await self.download(other, name)
            self.assertTrue(result.success, result.line())
            self.assertEqual(result.from_source, 0, result.line())
            self.assertEqual(sha256_file(req.output), sha)


async def _sleep(seconds: float) -> None:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    await d


# --- the requests of each port --------------------------------------------------------------


def supernode_api_requests(k: Known) -> st.SearchStrategy[Fuzzed]:
    tid, cid = values([k.task_id.encode(), b"0" * 64]), values([k.cid.encode(), b"cdnnode:127.0.0.1~x"])
    rng = values([k.piece_range.encode(), b"0-4194303", b"4194304-8388607"])
    nxt = values([b"0", b"1"])
    waits = st.sampled_from([b"0", b"0.1", b"-1", b"61", b"nan", b"inf", b"1e999", b"x", b"", "\uff10".encode()])
    routes = st.one_of(
        route(b"POST", b"/peer/registry"),
        route(b"POST", b"/peer/registry"),
        route(b"GET", b"/peer/task", taskId=tid, srcCid=cid, wait=waits, range=rng, result=values([b"501", b"500"]),
              dstCid=values([]), status=values([])),
        route(b"GET", b"/peer/piece/suc", taskId=tid, cid=cid, dstCid=values([f"cdnnode:127.0.0.1~{k.task_id}".encode()]),
              pieceRange=rng, range=rng, next=nxt),
        route(b"GET", b"/peer/piece/error", taskId=tid, cid=cid, srcCid=cid, dstCid=values([]), range=rng,
              kind=values([b"unreachable", b"refused", b"not found", b"digest mismatch", b"timeout", b"write"]),
              errorType=values([]), next=nxt),
        route(b"GET", b"/peer/service/down", taskId=values([b"0" * 64]), cid=values([b"nobody"])),
        route(b"GET", st.sampled_from([b"/_ping", b"/version", b"/metrics", b"/", b"/peer", b"/peer/registry",
                                       b"/download/" + k.task_id[:3].encode() + b"/" + k.task_id.encode()])),
    )
    urls = [f"{k.origin}small.bin", f"{k.origin}small.bin?sig=1&expires=2", f"{k.origin}other.bin",
            f"{k.origin}missing.bin", f"http://127.0.0.1:{k.closed_port}/x", "http://nowhere.invalid/x",
            "http://10.1.2.3/x", "https://127.0.0.1:1/x", "ftp://127.0.0.1/x", "http://u:p@127.0.0.1/x",
            "http://[::1]:1/x", "http://a_b/x", "http://127.0.0.1:99999/x", "http:///x", "http://%zz/"]
    schema = {
        "url": urls, "rawUrl": urls[:3], "headers": [["Authorization: Bearer x"], {"X-A": "b"}, [], ["bad"]],
        "md5": [None, "0" * 32], "identifier": [None, "id-1"], "digest": [None, "sha256:" + "0" * 64],
        "filter": [["sig", "expires"], "sig&expires", None], "cid": [f"fuzz-{n}" for n in range(4)] + [k.cid],
        "ip": ["127.0.0.1", "10.0.0.1", "::1"], "port": [0, 40000, 65535], "hostName": ["fuzz"], "version": ["0.1.0"],
    }
    essential = {codes.PEER_SECRET_HEADER.encode(): [k.secret.encode()], b"Content-Type": [b"application/json"]}
    return http_request(routes, header_strategy(essential), json_bodies(schema, ("url", "cid", "ip")), essential)


def cdn_requests(k: Known) -> st.SearchStrategy[Fuzzed]:
    real = f"/download/{k.task_id[:3]}/{k.task_id}".encode()
    paths = st.sampled_from([real, real, real, real, real, real, b"/download/" + k.task_id[:3].encode() + b"/" + k.task_id.encode()
                             + b".meta", b"/download/000/" + b"0" * 64, b"/download/", b"/", b"/download/" + real,
                             b"/repo/" + k.task_id[:3].encode(), b"/download/../../etc/passwd"])
    routes = st.one_of(route(b"GET", paths), route(b"GET", paths), route(b"GET", paths), route(b"HEAD", paths))
    essential = {codes.TASK_KEY_HEADER.encode(): [k.key.encode()],
                 b"Range": [b"bytes=0-99", b"bytes=0-%d" % (SMALL - 1), b"bytes=%d-" % SMALL, b"bytes=-10"]}
    return http_request(routes, header_strategy(essential), st.binary(max_size=100), essential)


def uploader_requests(k: Known) -> st.SearchStrategy[Fuzzed]:
    real = f"/peer/file/{k.task_id}".encode()
    paths = st.sampled_from([real, real, real, real, real, real, b"/peer/file/" + b"0" * 64, b"/peer/file/", b"/peer/file/"
                             + k.task_id.upper().encode(), b"/peer/file/../../meta/host.meta", b"/_ping"])
    routes = st.one_of(route(b"GET", paths), route(b"GET", paths), route(b"GET", paths), route(b"HEAD", paths))
    essential = {codes.TASK_KEY_HEADER.encode(): [k.key.encode()],
                 b"Range": [b"bytes=0-99", b"bytes=0-%d" % (SMALL - 1), b"bytes=%d-%d" % (SMALL, SMALL + 5)]}
    return http_request(routes, header_strategy(essential), st.binary(max_size=100), essential)


def local_api_requests(k: Known, out: str) -> st.SearchStrategy[Fuzzed]:
    """POST /local/download; with the real token, every output that is an absolute path lies under ``out``."""
    routes = st.one_of(route(b"POST", b"/local/download"), route(b"POST", b"/local/download"),
                       route(b"GET", st.sampled_from([b"/_ping", b"/local/download", b"/local", b"/"])))
    urls = [f"{k.origin}small.bin", f"{k.origin}other.bin", f"{k.origin}missing.bin",
            f"http://127.0.0.1:{k.closed_port}/x", "http://nowhere.invalid/x", "http://u:p@127.0.0.1:1/x",
            "file:///etc/passwd", "http://[::1]:1/"]
    outputs = [os.path.join(out, f"l{n}.bin") for n in range(8)] + [
        out, os.path.join(out, "missing", "dir", "x"), os.path.join(out, "..", "out", "dots.bin"),
        os.path.join(out, "a" * 300), os.path.join(out, "nul\x00.bin"), "relative.bin", "~/x.bin", ""]
    schema = {
        "url": urls, "output": outputs, "sign": [SIGN],
        "nodes": [[f"127.0.0.1:{k.api_port}"], [f"127.0.0.1:{k.closed_port}"], f"127.0.0.1:{k.api_port}", []],
        "headers": [["X-A: b"], []], "md5": [None, "0" * 32], "identifier": [None, "i"],
        "digest": [None, "sha256:" + k.task_id], "filter": [["sig"], "sig"], "timeout": [0, 5, 0.5],
        "minRate": [65536, "64K"], "notbs": [False, True], "localLimit": [0, "10M", 10**30],
        "totalLimit": [None, 0, "0"],
    }
    # Only bodies whose absolute outputs lie under ``out`` may carry the token: the daemon writes where it is told.
    headers = header_strategy({TOKEN_HEADER: [b"wrong", b""], b"Content-Type": [b"application/json"]})
    bodies = json_bodies(schema, ("url", "output", "sign"))
    return st.one_of(
        http_request(routes, headers, bodies),
        http_request(routes, headers, bodies.filter(lambda body: _outputs_under(body, out)),
                     {TOKEN_HEADER: [k.token.encode()]}),
        http_request(routes, headers, bodies.filter(lambda body: _outputs_under(body, out)),
                     {TOKEN_HEADER: [k.token.encode()]}),
    )


#: The real sign of a drawn download, made unique by `unique_signs` once drawn.
SIGN = "sign-0000000"


def unique_signs(requests: list[Fuzzed]) -> list[Fuzzed]:
    """Each download its own sign (same length, so the framing holds).

    Two downloads at once with one sign are one peer to the supernode, and
    one of them then waits out its whole timeout; dfget never does that.
    """
    numbers = iter(range(10**7))
    return [attrs.evolve(r, data=re.sub(SIGN.encode(), lambda _: b"sign-%07d" % next(numbers), r.data))
            for r in requests]


def _outputs_under(body: bytes, out: str) -> bool:
    """Whether every absolute path in ``body`` is under ``out`` (a body that is not an object holds none)."""
    text = body.decode("utf-8", "replace")
    return all(m == out or m.startswith(out + "/") for m in re.findall(r'"(/[^"]*)"', text))


def dfdaemon_requests(k: Known, registry_port: int, digest: str) -> st.SearchStrategy[Fuzzed]:
    blob = f"/v2/library/app/blobs/sha256:{digest}".encode()
    mirror = st.sampled_from([b"/_ping", b"/v2/", blob, blob, b"/v2/library/app/manifests/v1", b"/v2/library/app/blobs/sha256:"
                              + b"0" * 64, b"/v2/library/app/blobs/uploads/", b"/v2/../../etc", b"/v2/x/blobs/sha256:zz"])
    absolute = st.sampled_from([
        f"http://127.0.0.1:{registry_port}/v2/".encode(), f"http://127.0.0.1:{registry_port}".encode() + blob,
        f"http://127.0.0.1:{k.closed_port}/x".encode(), b"http://nowhere.invalid/x", b"http://10.1.2.3/x",
        f"http://u:p@127.0.0.1:{registry_port}/v2/".encode(), f"https://127.0.0.1:{k.closed_port}/".encode(),
        b"ftp://127.0.0.1/x", b"http:///x", b"http://127.0.0.1:99999/", b"http://[::1/", b"http://\xff/",
    ])
    connect = st.sampled_from([f"127.0.0.1:{k.closed_port}".encode(), b"127.0.0.1:22", b"nowhere.invalid:443",
                               b"[::1]:443", b"a:b", b"", b"127.0.0.1:99999", b"127.0.0.1:-1", b"http://x/"])
    routes = st.one_of(route(b"GET", mirror), route(b"GET", mirror), route(b"HEAD", mirror),
                       route(b"POST", mirror), route(b"PUT", mirror), route(b"PATCH", mirror),
                       route(b"GET", absolute), route(b"CONNECT", connect))
    headers = header_strategy({b"Authorization": [b"Basic dTpw", b"Bearer x"],
                               b"Accept": [b"application/vnd.oci.image.manifest.v1+json"]})
    return http_request(routes, headers, st.binary(max_size=2000))


# --- the tests ------------------------------------------------------------------------


class SupernodeFuzzTests(FuzzTestCase):
    async def test_register_api_survives_hostile_requests(self) -> None:
        """800 hostile requests to the register API: documented answers only, no traceback, flat memory, downloads work."""
        k = await self.start_world()
        await self.fuzz(k.api_port, supernode_api_requests(k), 800, SUPERNODE_API, self.supernode_state)
        await self.assertStillDownloads()

    async def test_cdn_survives_hostile_requests(self) -> None:
        """500 hostile requests to the CDN port: documented answers only, no traceback, flat memory, downloads work."""
        k = await self.start_world()
        await self.fuzz(k.cdn_port, cdn_requests(k), 500, CDN, self.supernode_state)
        await self.assertStillDownloads()


class PeerFuzzTests(FuzzTestCase):
    async def test_uploader_survives_hostile_requests(self) -> None:
        """500 hostile piece requests to a peer's uploader: documented answers, no traceback, it still serves."""
        k = await self.start_world()
        await self.fuzz(k.peer_port, uploader_requests(k), 500, PEER)
        received, _ = await self.exchange(k.peer_port, assemble(
            b"GET", f"/peer/file/{k.task_id}".encode(), b"HTTP/1.1",
            [(b"Range", b"bytes=0-%d" % (SMALL - 1)), (codes.TASK_KEY_HEADER.encode(), k.key.encode())],
            None, "length"))
        answer = parse_answer(received)
        assert answer is not None
        self.assertEqual((answer.status, hashlib.sha256(answer.body).hexdigest()), (206, self.small_sha))
        await self.assertStillDownloads()

    async def test_local_api_survives_hostile_requests(self) -> None:
        """500 hostile requests to the local API (some with its token): no 5xx or traceback; dfget's request still works."""
        k = await self.start_world()
        await self.fuzz(k.peer_port, local_api_requests(k, self.out), 500, PEER, prepare=unique_signs)
        output = os.path.join(self.out, "after-local.bin")
        body = json.dumps({"url": f"{k.origin}small.bin", "output": output, "sign": "after-1",
                           "nodes": [f"127.0.0.1:{k.api_port}"], "localLimit": 0}).encode()
        received, _ = await self.exchange(k.peer_port, assemble(
            b"POST", b"/local/download", b"HTTP/1.1", [(TOKEN_HEADER, k.token.encode())], body, "length"))
        answer = parse_answer(received)
        assert answer is not None
        result = json.loads(answer.body.splitlines()[-1])
        self.assertTrue(result["success"], result)
        self.assertEqual(sha256_file(output), self.small_sha)


class DfdaemonFuzzTests(FuzzTestCase):
    async def test_mirror_and_proxy_port_survives_hostile_requests(self) -> None:
        """700 hostile requests to dfdaemon's port: documented answers, no traceback, flat memory, a blob still comes P2P."""
        k = await self.start_world()
        blob = os.urandom(100_000)
        digest = self.registry.add_blob(blob)
        self.registry.manifests[b"/v2/library/app/manifests/v1"] = b'{"schemaVersion":2}'
        registry_port = int(self.registry_url.rsplit(":", 1)[1])
        daemon = await self.start_dfdaemon(connect_ports=(k.closed_port,))
        self.watched.append((daemon.parts.engine, daemon.uploads))
        await self.fuzz(daemon.port, dfdaemon_requests(k, registry_port, digest), 700, DFDAEMON, self.supernode_state)
        self.registry.hits.clear()
        response, body = await self.get(f"{daemon.url}/v2/library/app/blobs/sha256:{digest}")
        self.assertP2P(response, body, blob)
        self.assertEqual(sha256(body), digest)
