"""The HTTP face of the gateway: FastAPI handlers, the OpenAI request types, SSE and auth."""
