"""Gateway errors: their OpenAI-shaped bodies and headers."""

from __future__ import annotations

from gateway.errors import RateLimited


def test_rate_limit_errors_carry_retry_after() -> None:
    assert RateLimited("slow down", retry_after=0.2).headers() == {"Retry-After": "1"}
    assert RateLimited("slow down", retry_after=30.4).headers() == {"Retry-After": "30"}
    body = RateLimited("slow down").body()
    assert body == {"error": {"message": "slow down", "type": "rate_limit_error",
                              "param": None, "code": "rate_limit_exceeded"}}
