"""The gateway's one exception tree, rendered as OpenAI-shaped error bodies.

    GatewayError                      any error a client may see
    ├── InvalidRequest        400     malformed body or an unsupported parameter value
    ├── AuthenticationError   401     missing or unknown API key
    ├── PermissionDenied      403     the key may not use this policy or endpoint
    ├── NotFound              404     unknown model (policy alias or backend name) or route
    ├── RequestTimeout        408     the body did not arrive within its deadline
    ├── PayloadTooLarge       413     body over the configured limit
    ├── RateLimited           429     gateway saturated or upstream rate limit (with Retry-After)
    ├── UpstreamError         502     every backend failed
    ├── UpstreamTimeout       504     every backend ran past its deadline
    └── ClientDisconnected    499     the client left first, or stopped reading (only logged)

Third-party errors (litellm, aiohttp, httpx) are translated at the backend boundary and chained.
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    status_code = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after
        self.routing_headers: dict[str, str] = {}  # how the request was routed, when it was

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return dict(self.routing_headers)
        return {**self.routing_headers, "Retry-After": str(max(1, round(self.retry_after)))}


class InvalidRequest(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(GatewayError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status_code = 403
    error_type = "permission_error"


class NotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class RequestTimeout(GatewayError):
    status_code = 408
    error_type = "invalid_request_error"
    code = "request_timeout"

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "connection": "close"}  # the rest of the body is unread


class PayloadTooLarge(GatewayError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(GatewayError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamError(GatewayError):
    status_code = 502
    error_type = "upstream_error"
    code = "bad_gateway"


class ModelUnavailable(GatewayError):
    """The small model is down or overloaded and the policy fails fast (Retry-After set)."""

    status_code = 503
    error_type = "server_error"
    code = "model_unavailable"


class UpstreamTimeout(GatewayError):
    status_code = 504
    error_type = "upstream_error"
    code = "upstream_timeout"


class ClientDisconnected(GatewayError):
    """The client went away before the answer was ready; nobody is left to read a reply."""

    status_code = 499  # "client closed request", as nginx logs it
    error_type = "client_disconnected"
