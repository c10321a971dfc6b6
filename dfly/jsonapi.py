"""JSON envelope, errors and body parsing shared by dfly's klein APIs.

Every answer is ``{"code": int, "msg": str, "data": ...}`` with a real HTTP
status; handlers raise `ApiError` and never build error bodies themselves.
"""

from __future__ import annotations

import json
from typing import Any

from klein import Klein
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException

from dfly import codes

MAX_BODY = 64 * 1024

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


def read_json(request: IRequest, limit: int = MAX_BODY) -> dict[str, Any]:
    """The request's JSON object body, refused when too big or malformed."""
    body = request.content.read(limit + 1)
    if len(body) > limit:
        raise ApiError(413, codes.PARAM_ERROR, f"request body larger than {limit} bytes")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
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


def json_app() -> Klein:
    """A Klein app that answers every error in the JSON envelope.

    `ApiError` keeps its status and code; unknown routes and wrong methods
    become 404/405; anything unexpected is logged and becomes a 500.
    """
    app = Klein()

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
        log.failure("unexpected error in {method} {path}", failure, method=request.method, path=request.path)
        return error_body(request, ApiError(500, codes.SYSTEM_ERROR, f"internal error: {failure.getErrorMessage()}"))

    return app
