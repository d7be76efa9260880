"""The error envelope every endpoint answers with (vLLM shape, openai_api.md §6).

`APIError` is raised anywhere in the serving layer; the server turns it into
`{"error": {"message", "type", "param", "code"}}` with `code` = the HTTP status. Streams that
already started report it as one `data: {"error": ...}` event instead.
"""

from __future__ import annotations

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "BadRequestError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """A client-visible failure: HTTP status, one-line message, and the offending field if known."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.status, self.param)


def error_body(message: str, status: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "BadRequestError"),
                      "param": param, "code": status}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(message, 400, param)
