"""Errors in OpenAI's wire shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError

_FIELD = re.compile(r"^[a-z_][a-z0-9_]*$")  # union members show up in `loc` as type tags: 'str', 'list[str]'
_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          413: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse(self) -> str:
        """The in-band form sent when a stream already answered 200."""
        return f"data: {json.dumps(self.body())}\n\n"


def from_validation_error(e: ValidationError) -> APIError:
    """Name the first offending field as OpenAI does (`messages.0.role`), never FastAPI's 422."""
    err = e.errors(include_url=False)[0]
    loc = [str(p) for p in err["loc"] if isinstance(p, int) or (_FIELD.match(p) and p not in _TYPE_TAGS)]
    param = ".".join(loc) or None
    message = err["msg"].removeprefix("Value error, ")
    return APIError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")
