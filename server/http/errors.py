"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, and the app's handlers for them."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.engine.errors import InvalidRequest, Overloaded, ShuttingDown, UnknownAdapter

QUOTE_LIMIT = 64     # user input quoted in a message is cut to this many characters


def clip(text: object, limit: int = QUOTE_LIMIT) -> str:
    """User input for an error message: at most `limit` characters, marked when cut."""
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "…"


class ApiError(Exception):
    """An error answer: HTTP status plus OpenAI's error fields."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def unsupported(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param} is not supported: {why}", param=param, code="unsupported_parameter")


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"the model {clip(model)!r} does not exist: GET /v1/models lists the base model and its "
                    "adapters", param="model", code="model_not_found")


def from_domain(error: Exception, model: str) -> ApiError:
    """An engine error (at submission or from the engine thread) as the answer to give."""
    message = str(error.args[0]) if error.args else str(error)
    if isinstance(error, InvalidRequest):
        code = "context_length_exceeded" if "context" in message else None
        return ApiError(400, message, code=code)
    if isinstance(error, UnknownAdapter):
        return model_not_found(model)
    if isinstance(error, Overloaded):
        return ApiError(429, f"the server is busy: {message}; retry later", "rate_limit_error", code="queue_full")
    if isinstance(error, ShuttingDown):
        return ApiError(503, message, "server_error", code="shutting_down")
    return ApiError(500, f"the request failed: {clip(message, 200)}", "server_error")


def validation_error(error: RequestValidationError) -> ApiError:
    """The first problem pydantic found, naming the parameter (unknown ones as unsupported)."""
    problems = error.errors()
    if not problems:
        return ApiError(400, "invalid request body")
    first = problems[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = clip(loc[0]) if loc else None
    where = clip(".".join(loc)) if loc else "body"
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        return ApiError(400, f"unsupported parameter: {where}", param=clip(".".join(loc)),
                        code="unsupported_parameter")
    if kind == "json_invalid":
        return ApiError(400, "the body is not valid JSON")
    if kind == "missing" and not loc:
        return ApiError(400, "the body must be a JSON object")
    return ApiError(400, f"{where}: {first.get('msg', 'invalid value')}", param=param)


def install(app: FastAPI) -> None:
    """Every error the app answers, in OpenAI's shape."""

    async def api_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, ApiError)
        return error.response()

    async def invalid(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        return validation_error(error).response()

    async def http_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return ApiError(error.status_code, str(error.detail), kind).response()

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
