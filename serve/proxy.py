"""Ray Serve's HTTP proxy, made to answer like the app: every error in the one-line JSON format.

The proxy (uvicorn, in Ray's own actor) answers some requests itself, in plain text: a 500 when the
ingress replica that held a request died, a 503 while no ingress replica is up. ``JsonErrors`` rewrites
those. Ray installs it where ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` names ``proxy_middlewares``
in the environment of the node that starts the proxy: ``litefocus-serve`` and the tests set it for the
cluster they start; a cluster started with ``ray start`` needs it in that command's environment.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "litefocus.serve.proxy:proxy_middlewares"
LOST_HEADERS = [(b"retry-after", b"2")]


class JsonErrors:
    """ASGI middleware for Ray Serve's HTTP proxy: an error answer that is not JSON (the proxy's own
    plain-text 500/503 while an ingress replica is lost or none is up) goes out as the one-line JSON.
    See the module docstring for how it is installed."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"held": None, "body": b"", "started": False}

        async def send_json(status: int, text: str, headers: list) -> None:
            error = " ".join(text.split())[:300] or f"HTTP {status}"
            keep = [(k, v) for k, v in headers if k.lower() in (b"retry-after", b"x-request-id")]
            response = JSONResponse({"error": error, "field": None}, status_code=status)
            response.raw_headers = [*response.raw_headers, *keep]
            state["started"] = True
            await response(scope, receive, send)

        async def relay(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                kind = dict((k.lower(), v) for k, v in headers).get(b"content-type", b"")
                if message["status"] >= 400 and not kind.startswith(b"application/json"):
                    state["held"] = message  # rewritten once its body is complete
                    return
                state["started"] = True
            elif message["type"] == "http.response.body" and state["held"] is not None:
                state["body"] += message.get("body", b"")
                if not message.get("more_body", False):
                    held = state["held"]
                    await send_json(held["status"], state["body"].decode("utf-8", "replace"), held["headers"])
                return
            await send(message)

        try:
            await self.app(scope, receive, relay)
        except Exception as e:
            if state["started"]:
                raise
            await send_json(500, f"the service failed ({type(e).__name__}); retry shortly", [])
            return
        if not state["started"]:  # the proxy answered nothing: its ingress replica was lost
            await send_json(
                503, "the request was lost with its ingress replica; retry: Serve restarts it", LOST_HEADERS
            )


def proxy_middlewares() -> list:
    """``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` target: the proxy's middlewares."""
    from starlette.middleware import Middleware

    return [Middleware(JsonErrors)]
