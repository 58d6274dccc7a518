"""Answers for requests refused before any handler ran (auth, overload).

The original endpoints answer `error: <what>` as text/plain; /v1 paths answer the /v1
error document `{"error": {"code", "message"}}` in JSON or msgpack, chosen like every
other /v1 answer (docs/api.md): JSON when `Accept` names application/json or the query
has format=json, msgpack otherwise.
"""
from __future__ import annotations

import json
from typing import Mapping

import msgpack
from aiohttp import web

V1_PREFIX = "/v1/"


def is_v1(request: web.Request) -> bool:
    return request.path.startswith(V1_PREFIX)


def wants_json(request: web.Request) -> bool:
    return "application/json" in request.headers.get("Accept", "") or request.query.get("format") == "json"


def refuse(request: web.Request, status: int, code: str, message: str,
           headers: Mapping[str, str] | None = None) -> web.Response:
    """The refusal in the shape of the API the path belongs to."""
    if not is_v1(request):
        return web.Response(status=status, text=f"error: {message}", headers=headers)
    doc = {"error": {"code": code, "message": message}}
    if wants_json(request):
        return web.Response(status=status, text=json.dumps(doc), content_type="application/json",
                            headers=headers)
    return web.Response(status=status, body=msgpack.packb(doc), content_type="application/msgpack",
                        headers=headers)
