"""The FastAPI app: the generation routers, the small routes (models, health, metrics, tokenize), and the gate
every /v1 request passes (API key, drain, in-flight count)."""

from __future__ import annotations

import time

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from plait.server import chat, completions
from plait.server.errors import error_response, install_error_handlers
from plait.server.protocol import DetokenizeRequest, TokenizeRequest, conversation
from plait.server.state import ServerState


class Gate:
    """Pure ASGI (not BaseHTTPMiddleware) so a streamed response counts as in flight until its last byte is sent."""

    def __init__(self, app: ASGIApp, server: ServerState):
        self.app, self.server = app, server
        key = server.config.api_key
        self.expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            return await self.app(scope, receive, send)
        if self.expected is not None and dict(scope["headers"]).get(b"authorization") != self.expected:
            return await error_response(401, "invalid API key: send `Authorization: Bearer <key>`")(scope, receive, send)
        if self.server.draining:
            return await error_response(503, "the server is shutting down")(scope, receive, send)
        self.server.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.server.in_flight -= 1


def build_app(server: ServerState) -> FastAPI:
    app = FastAPI(title="plait", docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_middleware(Gate, server=server)
    install_error_handlers(app)
    app.include_router(completions.router)
    app.include_router(chat.router)
    created = int(time.time())

    @app.get("/health")
    async def health() -> Response:
        """200 while the engine works and the server takes requests; 503 once it is draining or the engine failed."""
        if server.loop.error is not None:
            return error_response(503, f"the engine has failed: {server.loop.error}")
        return error_response(503, "the server is shutting down") if server.draining else Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        card = {"id": server.model_name, "object": "model", "created": created, "owned_by": "plait",
                "root": server.loop.info.model or server.model_name, "max_model_len": server.max_model_len}
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> JSONResponse:
        server.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            return error_response(400, "give exactly one of `prompt` and `messages`", "prompt")
        if body.messages is not None:
            ids = server.tokenizer.chat(conversation(body.messages), body.add_generation_prompt)
        else:
            ids = server.tokenizer.encode(body.prompt, body.add_special_tokens)
        return JSONResponse({"count": len(ids), "max_model_len": server.max_model_len, "tokens": ids})

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> JSONResponse:
        server.check_model(body.model)
        return JSONResponse({"prompt": server.tokenizer.decode(body.tokens)})

    return app
