"""The gateway's OpenAPI document: what FastAPI derives from the routes, plus what it cannot
see because handlers validate bodies themselves (to answer in OpenAI's error shape): the
request bodies, the bearer key and the error body every failure uses."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from gateway.api.openai_types import ChatCompletionRequest, CompletionRequest

_REF = "#/components/schemas/{model}"
_BODIES = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
}
_OPEN = {"/healthz", "/readyz", "/metrics"}
ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string"},
            "param": {"type": ["string", "null"]},
            "code": {"type": ["string", "null"]},
        },
    }},
}


def install_openapi(app: FastAPI) -> None:
    """Serve the completed document on `/openapi.json` (built once, on first request)."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _complete(plain())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _complete(document: dict[str, Any]) -> dict[str, Any]:
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    error = {"description": "An OpenAI-shaped error", "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for path, operations in document["paths"].items():
        for operation in operations.values():
            operation["responses"].setdefault("default", error)
            if path not in _OPEN:
                operation["security"] = [{"bearer": []}]
    for path, model in _BODIES.items():
        schema = model.model_json_schema(ref_template=_REF)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        document["paths"][path]["post"]["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}}}
    return document
