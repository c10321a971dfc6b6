"""JSON envelope, errors and body parsing shared by dfly's klein APIs.

Every answer is ``{"code": int, "msg": str, "data": ...}`` with a real HTTP
status; handlers raise `ApiError` and never build error bodies themselves.
`FastRoutes` serves the few routes hot enough that klein's routing shows
in the profile, with the same envelope.  Bad input is a 4xx in that
envelope, never a traceback: `parse_json` bounds
nesting (``[`` * 100000 would raise RecursionError in `json.loads`), and
`json_app`'s resource answers a request whose path or Host is not UTF-8
itself (klein would log a traceback and answer in HTML).  Body size is
bounded twice: by `dfly.webbounds.BoundedSite` while it arrives, and by
`read_json` for resources served without it.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Union

from klein import Klein
from klein.resource import KleinResource
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET
from werkzeug.exceptions import HTTPException

from dfly import codes
from dfly.webbounds import MAX_BODY

#: Deepest nesting of arrays and objects a JSON document may have.  Our
#: bodies and answers need 3; far below the recursion limit, so neither the
#: parser nor any handler (``repr`` of a field in an error message) can hit it.
MAX_DEPTH = 32

log = Logger(namespace="dfly.api")


class ApiError(Exception):
    """A refusal with its HTTP status, Dragonfly code and a one-line reason."""

    def __init__(self, status: int, code: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.code = code
        self.msg = msg


def bad_request(msg: str) -> ApiError:
    return ApiError(400, codes.PARAM_ERROR, msg)


def envelope(request: IRequest, code: int, msg: str = "", data: Any = None, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    body: dict[str, Any] = {"code": code, "msg": msg}
    if data is not None:
        body["data"] = data
    return json.dumps(body).encode() + b"\n"


def error_body(request: IRequest, error: ApiError) -> bytes:
    return envelope(request, error.code, error.msg, status=error.status)


def parse_json(text: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """`json.loads`, with ValueError (never RecursionError) for nesting deeper than ``max_depth``.

    For every JSON that comes from the network: request bodies, the
    supernode's answers to the engine.
    """
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"nested deeper than {max_depth} levels") from None
    if _deeper_than(value, max_depth):
        raise ValueError(f"nested deeper than {max_depth} levels")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays/objects nest more than ``limit`` levels (iteratively: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def read_json(request: IRequest, limit: int = MAX_BODY) -> dict[str, Any]:
    """The request's JSON object body, refused when too big, too deep or malformed."""
    body = request.content.read(limit + 1)
    if len(body) > limit:
        raise ApiError(413, codes.PARAM_ERROR, f"request body larger than {limit} bytes")
    try:
        data = parse_json(body)
    except ValueError as e:  # UnicodeDecodeError included
        raise bad_request(f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    return data


def query_arg(request: IRequest, name: str, required: bool = True, default: str = "") -> str:
    values = request.args.get(name.encode())
    if not values:
        if required:
            raise bad_request(f"missing query parameter {name!r}")
        return default
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request(f"query parameter {name!r} is not UTF-8") from None


def query_int(request: IRequest, name: str, required: bool = True, default: int = 0) -> int:
    text = query_arg(request, name, required, str(default))
    try:
        return int(text)
    except ValueError:
        raise bad_request(f"query parameter {name!r} must be an integer, got {text!r}") from None


class _JsonKleinResource(KleinResource):
    """Klein's resource, answering a non-UTF-8 path or a Host that is no host name itself: 400 JSON, nothing logged.

    Klein decodes both as UTF-8 before routing; when that fails it logs the
    UnicodeDecodeError with its traceback (``log.err``: critical) and
    answers 400 in HTML.  werkzeug then IDNA-encodes the host
    (``Map.bind``), and a label it cannot encode (``Host: a..b``, a label
    over 63 characters) raises ``BadHost`` outside klein's error handlers:
    a traceback and a 500 in HTML.  Anyone can send ``GET /%ff`` or such a
    Host, so neither is worth a traceback; the checks here are the ones
    klein and werkzeug make.
    """

    def render(self, request: IRequest) -> Any:
        try:
            b"/".join(request.prepath + request.postpath).decode("utf-8")
            host = request.getRequestHostname().decode("utf-8")
        except UnicodeDecodeError:
            return _refused(request, "the request path or Host header is not UTF-8")
        try:
            host.lower().partition(":")[0].encode("idna")  # as werkzeug's Map.bind does
        except UnicodeError:
            return _refused(request, "the Host header is not a valid host name")
        return super().render(request)


def _refused(request: IRequest, msg: str) -> bytes:
    body = error_body(request, bad_request(msg))
    return b"" if request.method == b"HEAD" else body


class _JsonKlein(Klein):
    # Klein binds an app to each instance of its class with ``self.__class__()``,
    # so the bound copies serve this resource too.
    def resource(self) -> KleinResource:
        return _JsonKleinResource(self)


def json_app() -> Klein:
    """A Klein app that answers every error in the JSON envelope.

    `ApiError` keeps its status and code; unknown routes and wrong methods
    become 404/405; a path or Host that is not UTF-8 is a 400; anything
    unexpected is logged with its traceback and becomes a 500 whose reason
    is only "internal error".
    """
    app = _JsonKlein()

    @app.handle_errors(ApiError)
    def api_error(instance: Any, request: IRequest, failure: Any) -> bytes:
        return error_body(request, failure.value)

    @app.handle_errors(HTTPException)
    def http_error(instance: Any, request: IRequest, failure: Any) -> bytes:
        e = failure.value
        where = f"{request.method.decode()} {request.path.decode(errors='replace')}"
        return error_body(request, ApiError(e.code, codes.PARAM_ERROR, f"{where}: {e.name}"))

    @app.handle_errors(Exception)
    def internal_error(instance: Any, request: IRequest, failure: Any) -> bytes:
        return _internal_error(request, failure)

    return app


Handler = Callable[[IRequest], Union[bytes, "Deferred[bytes]"]]


class FastRoutes(Resource):
    """A few exact ``GET`` paths answered without klein, everything else by ``fallback`` (a klein resource).

    Why: on the supernode's pull and report routes klein's machinery (the
    werkzeug URL map, URL rebuilding, ``maybeDeferred``, error-handler
    dispatch) cost about a third of the CPU per report at 1,000 peers, more
    than the scheduling itself.  A handler here is a plain function of the
    request returning bytes, or a Deferred of bytes for an answer that waits
    (a held pull); errors are answered as `json_app` answers them: `ApiError`
    with its status, anything else logged and a 500.  When the client goes
    away first, the Deferred is cancelled, so a held pull lets go at once.
    Another method on one of these paths is a 405 in the envelope.
    """

    isLeaf = True

    def __init__(self, routes: Mapping[bytes, Handler], fallback: IResource) -> None:
        super().__init__()
        self.routes = dict(routes)
        self.fallback = fallback

    def render(self, request: IRequest) -> Any:
        handler = self.routes.get(request.path)
        if handler is None:
            return self.fallback.render(request)
        if request.method != b"GET":
            request.setHeader(b"allow", b"GET")
            where = f"{request.method.decode(errors='replace')} {request.path.decode()}"
            body = error_body(request, ApiError(405, codes.PARAM_ERROR, f"{where}: Method Not Allowed"))
            return b"" if request.method == b"HEAD" else body
        try:
            result = handler(request)
        except ApiError as e:
            return error_body(request, e)
        except Exception:
            return _internal_error(request, Failure())
        if not isinstance(result, Deferred):
            return result
        gone: list[bool] = []

        def client_gone(reason: Failure) -> None:
            gone.append(True)
            result.cancel()

        def answer(body: bytes) -> None:
            if not gone:
                request.write(body)
                request.finish()

        def failed(failure: Failure) -> None:
            if gone and failure.check(CancelledError):
                return
            if gone:
                log.failure("error after the client left {method} {path}", failure, method=request.method, path=request.path)
                return
            body = error_body(request, failure.value) if failure.check(ApiError) else _internal_error(request, failure)
            request.write(body)
            request.finish()

        request.notifyFinish().addErrback(client_gone)
        result.addCallbacks(answer, failed)
        return NOT_DONE_YET


#: The whole reason given for an error the client did not cause.
INTERNAL_ERROR = "internal error"


def _internal_error(request: IRequest, failure: Failure) -> bytes:
    """A bug or an unforeseen failure: 500, and nothing of it but the words "internal error".

    The exception's text often names a path under the home, a peer or a
    URL of another caller; it and the traceback go to the log only.
    """
    log.failure("unexpected error in {method} {path}", failure, method=request.method, path=request.path)
    return error_body(request, ApiError(500, codes.SYSTEM_ERROR, INTERNAL_ERROR))
