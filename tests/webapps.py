"""The web apps the gunicorn and uvicorn tests serve (workers run this code).

WSGI ``wsgi_app`` (gunicorn workers, ``netplex_native.gunicorn.domain()``) and
ASGI ``asgi_app`` (uvicorn workers, ``netplex_native.uvicorn.domain()``), with
the same routes, each answering JSON with the worker's pid:
  /info                      the segment's name
  /hold?name=M&timeout=T     lock M and keep it (the worker holds it until it dies)
  /try?name=M&timeout=T      lock M, read its token, unlock
  /release?name=M            unlock M (held by this worker)
  /take?name=S&timeout=T     take a unit of the protected semaphore S (2 units) and keep it
  /get?name=S                the value of S
"""

from __future__ import annotations

import json
import os
from urllib.parse import parse_qs


def _route(d, path: str, q: dict) -> dict:
    name = q.get("name", "m")
    timeout = float(q.get("timeout", "5"))
    out: dict = {"pid": os.getpid()}
    if path == "/info":
        out["segment"] = d.name
    elif path in ("/hold", "/try"):
        m = d.mutex(name)
        out["ok"] = m.acquire(timeout=timeout)
        out["token"] = m.token
        if out["ok"] and path == "/try":
            m.release()
    elif path == "/release":
        d.mutex(name).release()
        out["ok"] = True
    elif path == "/take":
        out["ok"] = d.semaphore(name, 2).acquire(timeout=timeout)
    elif path == "/get":
        out["value"] = d.semaphore(name, 2).get()
    return out


def wsgi_app(environ, start_response):
    from netplex_native.gunicorn import domain
    q = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    body = json.dumps(_route(domain(), environ["PATH_INFO"], q)).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


async def asgi_app(scope, receive, send):
    if scope["type"] != "http":
        return
    from netplex_native.uvicorn import domain
    d = domain()
    q = {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
    path = scope["path"]
    out: dict = {"pid": os.getpid()}
    name = q.get("name", "m")
    timeout = float(q.get("timeout", "5"))
    if path in ("/hold", "/try"):                 # awaitable waits: the loop keeps serving
        m = d.mutex(name)
        out["ok"] = await m.acquire_async(timeout=timeout)
        out["token"] = m.token
        if out["ok"] and path == "/try":
            m.release()
    elif path == "/take":
        out["ok"] = await d.semaphore(name, 2).acquire_async(timeout=timeout)
    else:
        out = _route(d, path, q)
    body = json.dumps(out).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
