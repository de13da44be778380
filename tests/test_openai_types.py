"""OpenAI request validation: errors that name the parameter, parameters forwarded."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.api.openai_types import ChatCompletionRequest, CompletionRequest, parse
from gateway.errors import InvalidRequest

MESSAGES = [{"role": "user", "content": "hi"}]


def invalid(model: type, body: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        parse(model, body)
    error = caught.value
    assert error.status_code == 400 and error.error_type == "invalid_request_error"
    assert "pydantic" not in error.message and "errors.pydantic.dev" not in error.message
    return error


def chat(**fields: Any) -> ChatCompletionRequest:
    return parse(ChatCompletionRequest, {"model": "auto", "messages": MESSAGES, **fields})


def test_only_one_choice_is_supported() -> None:
    error = invalid(ChatCompletionRequest, {"model": "auto", "messages": MESSAGES, "n": 2})
    assert error.param == "n" and "n=1" in error.message
    assert chat(n=1).n == 1
    assert "n" not in chat(n=1).model_params()
    legacy = invalid(CompletionRequest, {"model": "auto", "prompt": "hi", "n": 3})
    assert legacy.param == "n"


def test_max_completion_tokens_folds_into_max_tokens() -> None:
    params = chat(max_completion_tokens=50).model_params()
    assert params["max_tokens"] == 50 and "max_completion_tokens" not in params
    both = chat(max_tokens=10, max_completion_tokens=20).model_params()
    assert both["max_tokens"] == 20
    assert chat(max_tokens=10).model_params()["max_tokens"] == 10
    assert invalid(ChatCompletionRequest, {"model": "auto", "messages": MESSAGES,
                                           "max_completion_tokens": 0}).param == (
        "max_completion_tokens")


def test_at_most_four_stop_sequences() -> None:
    error = invalid(ChatCompletionRequest, {"model": "auto", "messages": MESSAGES,
                                            "stop": ["a", "b", "c", "d", "e"]})
    assert error.param == "stop" and "4 stop sequences" in error.message
    assert chat(stop=["a", "b", "c", "d"]).model_params()["stop"] == ["a", "b", "c", "d"]
    assert chat(stop="END").model_params()["stop"] == "END"


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"model": "auto"}, "messages", "Missing required parameter: 'messages'."),
        ({"messages": MESSAGES}, "model", "Missing required parameter: 'model'."),
        ({"model": "auto", "messages": []}, "messages", "Invalid value for 'messages'"),
        ({"model": "auto", "messages": MESSAGES, "temperature": 2.5}, "temperature",
         "Invalid value for 'temperature'"),
        ({"model": "auto", "messages": MESSAGES, "temperature": "hot"}, "temperature",
         "Invalid value for 'temperature'"),
        ({"model": "auto", "messages": [{"role": "robot", "content": "x"}]},
         "messages.0.role", "Invalid value for 'messages.0.role'"),
        ({"model": "auto", "messages": MESSAGES, "top_logprobs": 21}, "top_logprobs",
         "Invalid value"),
    ],
)
def test_invalid_requests_name_the_parameter(body: dict[str, Any], param: str, says: str) -> None:
    error = invalid(ChatCompletionRequest, body)
    assert error.param == param
    assert says in error.message
    assert error.body()["error"]["param"] == param


def test_body_must_be_an_object() -> None:
    for body in ([], "text", None, 3):
        assert "JSON object" in invalid(ChatCompletionRequest, body).message


def test_parameters_forwarded_to_models() -> None:
    request = chat(stream=True, stream_options={"include_usage": True}, temperature=0,
                   seed=7, metadata={"sdk": "extra"}, tools=[{"type": "function"}])
    params = request.model_params()
    assert params["temperature"] == 0 and params["seed"] == 7 and params["tools"]
    assert not {"model", "stream", "stream_options", "n"} & set(params)
    assert "top_p" not in params  # unset values are not sent
    assert request.include_usage
    assert not chat(stream_options={"include_usage": True}).include_usage  # not streamed


def test_legacy_prompt_becomes_one_user_message() -> None:
    request = parse(CompletionRequest, {"model": "auto", "prompt": ["Say hi"], "max_tokens": 5,
                                        "stream": True})
    as_chat = request.as_chat()
    assert as_chat.model_params()["messages"] == [{"role": "user", "content": "Say hi"}]
    assert as_chat.model_params()["max_tokens"] == 5 and as_chat.stream
    error = invalid(CompletionRequest, {"model": "auto", "prompt": ["a", "b"]})
    assert error.param == "prompt"
