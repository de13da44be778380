"""Validation of incoming OpenAI requests. Errors become 400s naming the offending field."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.errors import InvalidRequest


class _Lenient(BaseModel):
    # Unknown fields are tolerated (SDKs add their own); only known ones are forwarded.
    model_config = ConfigDict(extra="allow")


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("only n=1 is supported: the gateway returns one choice per request")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_count(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def model_params(self) -> dict[str, Any]:
        """The parameters forwarded to models, with `max_completion_tokens` folded in."""
        params = self.model_dump(
            exclude_none=True,
            exclude={"model", "stream", "stream_options", "n", "max_completion_tokens"},
        )
        if self.max_completion_tokens is not None:
            params["max_tokens"] = self.max_completion_tokens
        return params

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Lenient):
    """Legacy `/v1/completions`: run through the same cascade as one user message."""

    model: str = Field(min_length=1)
    prompt: str | list[str]
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None

    _one_choice = field_validator("n")(ChatCompletionRequest._one_choice.__func__)

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return value

    def as_chat(self) -> ChatCompletionRequest:
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        fields = self.model_dump(exclude_none=True, exclude={"prompt"})
        return ChatCompletionRequest(**fields, messages=[{"role": "user", "content": prompt}])


def parse(model: type[BaseModel], body: Any) -> Any:
    """Validate `body`; the first problem becomes an OpenAI-style 400 with `param` set."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "missing":
            message = f"Missing required parameter: '{param}'."
        else:
            message = f"Invalid value for '{param}': {message}."
        raise InvalidRequest(message, param=param) from None
