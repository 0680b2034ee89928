"""FrontDoor's fast path (runners/api/front_door.py): a well-formed request to a model route is answered by the
route's own function without the framework's layers; everything else goes down the normal stack with
the body intact, so both give the same answers.

In-process tests drive FrontDoor as an ASGI app around a recording stand-in for BentoML's app; the
server tests send the same bodies down both paths (a `NaN` in an ignored field: Python's JSON parser
reads it, orjson does not, so that request takes the framework's route) and compare the answers.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import numpy as np
import pytest
from pydantic import BaseModel

from runners.api.front_door import FrontDoor
from runners.api.routes import Route
from runners.errors import BadRequest


class Body(BaseModel):
    input: str
    n: int = 1


class InnerApp:
    """Stands in for BentoML's app below FrontDoor: records what reached it and answers 200 {"inner": ...}."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        self.bodies.append(body)
        out = json.dumps({"inner": body.decode("utf-8", "replace")}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": out})


async def handle(body: Body) -> dict[str, Any]:
    if body.input == "refuse":
        raise BadRequest("refused: send another input", param="input")
    return {"echo": body.input * body.n}


def door(inner: InnerApp, max_body_bytes: int = 1000) -> FrontDoor:
    return FrontDoor(inner, api_keys=(), metrics_public=True, max_body_bytes=max_body_bytes,
                     fast_routes={path: Route("POST", path, handle, Body) for path in ("/fast", "/tei/fast")})


def post(app: FrontDoor, path: str, content: bytes, content_type: str | None = "application/json",
         method: str = "POST") -> httpx.Response:
    async def go() -> httpx.Response:
        headers = {"content-type": content_type} if content_type else {}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.request(method, path, content=content, headers=headers)

    return asyncio.run(go())


def test_a_valid_body_is_answered_without_the_app_below():
    inner = InnerApp()
    response = post(door(inner), "/fast", b'{"input": "ab", "n": 2}')
    assert response.status_code == 200
    assert response.json() == {"echo": "abab"}
    assert response.headers["x-request-id"]
    assert inner.bodies == []


@pytest.mark.parametrize("content", [b'{"input": 3}', b'{"n": 2}', b"[1]", b""])
def test_a_body_the_schema_refuses_reaches_the_route_with_its_body(content):
    inner = InnerApp()
    response = post(door(inner), "/fast", content)
    assert response.status_code == 200 and response.json() == {"inner": content.decode()}
    assert inner.bodies == [content]


@pytest.mark.parametrize("path", ["/fast", "/other", "/tei/fast"])
@pytest.mark.parametrize("content_type", ["application/json", None, "text/plain", "application/problem+json"])
@pytest.mark.parametrize("content", [b'{"input": "ab", "x": NaN}', b"not json", b'{"input": "\\ud800"}',
                                     b"\xff\xfe{}", b'{"input": "a"} trailing', b"[" * 600, b"[" * 255 + b"]" * 255])
def test_a_body_the_parser_refuses_is_one_400_on_every_route(path, content_type, content):
    """One parser for every JSON body (runners.api.responses.parse_json): nothing below FrontDoor parses a
    body it refused (a deep one was a RecursionError's 500 in the frameworks, or TEI's 424)."""
    inner = InnerApp()
    response = post(door(inner), path, content, content_type)
    assert inner.bodies == []
    if path.startswith("/tei"):
        assert response.status_code == 422 and response.json()["error_type"] == "Validation"
        message = response.json()["error"]
    else:
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
        message = response.json()["error"]["message"]
    assert message.startswith("the request body is not valid JSON (") and "line 1 column" in message, message


@pytest.mark.parametrize("path,content_type,method", [
    ("/fast", "text/plain", "POST"),
    ("/fast", "application/vnd.test+json", "POST"),
    ("/fast", None, "POST"),
    ("/fast", "application/x-www-form-urlencoded", "POST"),
    ("/fast", "application/json", "PUT"),
    ("/other", "application/json", "POST"),
])
def test_other_paths_methods_and_content_types_take_the_normal_route(path, content_type, method):
    inner = InnerApp()
    response = post(door(inner), path, b'{"input": "ab"}', content_type, method)
    assert response.json() == {"inner": '{"input": "ab"}'}
    assert len(inner.bodies) == 1


def test_json_with_a_charset_parameter_is_json():
    inner = InnerApp()
    response = post(door(inner), "/fast", b'{"input": "ab"}', "Application/JSON; charset=utf-8")
    assert response.json() == {"echo": "ab"} and inner.bodies == []


def test_service_errors_take_the_envelope_and_tei_errors_the_tei_body():
    app = door(InnerApp())
    response = post(app, "/fast", b'{"input": "refuse"}')
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "refused: send another input"
    assert response.json()["error"]["param"] == "input"
    tei = post(app, "/tei/fast", b'{"input": "refuse"}')
    assert tei.status_code == 422 and tei.json() == {"error": "refused: send another input", "error_type": "Validation"}


def send_in_chunks(app: FrontDoor, chunks: list[bytes]) -> list[dict[str, Any]]:
    """POST /fast with the body arriving in `chunks`; the messages FrontDoor sent back."""
    sent: list[dict[str, Any]] = []
    pending = list(chunks)

    async def receive() -> dict[str, Any]:
        body = pending.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(pending)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/fast", "raw_path": b"/fast", "query_string": b"",
             "headers": [(b"content-type", b"application/json")]}
    asyncio.run(app(scope, receive, send))
    return sent


def test_a_body_that_streams_past_the_limit_is_refused():
    sent = send_in_chunks(door(InnerApp(), max_body_bytes=40), [b'{"input": "', b"x" * 30, b"x" * 30, b'"}'])
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"]["code"] == "body_too_large"


def test_a_body_in_chunks_is_joined():
    inner = InnerApp()
    sent = send_in_chunks(door(inner), [b'{"inp', b'ut": "a', b'b"}'])
    assert sent[0]["status"] == 200 and json.loads(sent[1]["body"]) == {"echo": "ab"} and inner.bodies == []


def test_a_malformed_multipart_body_is_a_400_and_a_form_reaches_the_route():
    # BentoML's native routes read a multipart body as a form and answered a 500 when it was not one.
    inner = InnerApp()
    for content_type in ("multipart/form-data", "multipart/form-data; boundary=xyz"):
        response = post(door(inner), "/other", b'{"input": "ab"}', content_type)
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_multipart"
        tei = post(door(inner), "/tei/other", b'{"input": "ab"}', content_type)
        assert tei.status_code == 422 and tei.json()["error_type"] == "Validation"
    assert inner.bodies == []
    form = b'--xyz\r\nContent-Disposition: form-data; name="input"\r\n\r\nab\r\n--xyz--\r\n'
    response = post(door(inner), "/other", form, "multipart/form-data; boundary=xyz")
    assert response.status_code == 200 and inner.bodies == [form]


class MethodNotAllowed(InnerApp):
    """Answers as Starlette does for a method a route does not take: plain text, with `Allow`."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 405,
                    "headers": [(b"content-type", b"text/plain"), (b"allow", b"POST")]})
        await send({"type": "http.response.body", "body": b"Method Not Allowed"})


def test_a_405_keeps_its_allow_header_in_the_envelope():
    for path in ("/other", "/tei/other"):
        response = post(door(MethodNotAllowed()), path, b"", None, "TRACE")
        assert response.status_code == 405 and response.headers["allow"] == "POST"
        body = response.json()
        assert body["error"]["code"] == "method_not_allowed" if path == "/other" else body["error_type"] == "Validation"


def test_teis_openai_route_answers_errors_in_its_own_shape():
    app = FrontDoor(InnerApp(), api_keys=(), metrics_public=True, max_body_bytes=1000,
                    fast_routes={"/tei/v1/embeddings": Route("POST", "/tei/v1/embeddings", handle, Body)})
    response = post(app, "/tei/v1/embeddings", b'{"input": "refuse"}')
    assert response.status_code == 422
    assert response.json() == {"message": "refused: send another input", "code": 422, "type": "Validation",
                               "error_type": "Validation"}
    assert int(response.headers["content-length"]) == len(response.content)
    too_large = post(app, "/tei/v1/embeddings", b'{"input": "' + b"x" * 2000 + b'"}')
    assert too_large.status_code == 413 and too_large.json()["code"] == 413 and "message" in too_large.json()
    assert post(app, "/tei/v1/embeddings", b'{"input": "ab"}').json() == {"echo": "ab"}


# ---- the real routes: fast path and framework path answer alike ----

BODIES = [
    ("/v1/embeddings", {"model": "minilm", "input": ["hello world", "cats"], "dimensions": 64}),
    ("/embed", {"model": "minilm", "input": "hello world", "normalize": False}),
    ("/v2/embed", {"model": "minilm", "texts": ["hello"], "input_type": "search_query",
                   "embedding_types": ["float", "int8"]}),
    ("/rerank", {"model": "cross-encoder", "query": "paris", "documents": ["Paris is in France", "cats"]}),
    ("/rerank", {"model": "cross-encoder", "query": "paris", "texts": ["Paris is in France", "cats"]}),
    ("/v1/rerank", {"model": "cross-encoder", "query": "paris", "documents": ["cats", "Paris"], "top_n": 1}),
    ("/v2/rerank", {"model": "cross-encoder", "query": "paris", "documents": ["cats", "Paris"]}),
    ("/classify", {"model": "classifier", "input": ["good", "bad"]}),
    ("/tei/embed", {"model": "minilm", "inputs": ["hello world"]}),
    ("/tei/rerank", {"model": "cross-encoder", "query": "paris", "texts": ["cats", "Paris"], "return_text": True}),
    ("/tei/v1/embeddings", {"model": "minilm", "input": ["hello world", "cats"], "dimensions": 64}),
    # refused by the service (not by the schema): the same error both ways
    ("/v1/embeddings", {"model": "no-such-model", "input": "hello"}),
    ("/tei/v1/embeddings", {"model": "no-such-model", "input": "hello"}),
    ("/tei/embed", {"model": "cross-encoder", "inputs": "hello"}),
]


def numbers_close(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(numbers_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(numbers_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return bool(np.isclose(a, b, atol=1e-5))
    return a == b


@pytest.mark.parametrize("path,body", BODIES)
def test_fast_and_framework_paths_give_the_same_answer(models_server, path, body):
    fast = httpx.post(models_server.url + path, json=body, timeout=60)
    # Only `application/json` takes the fast path: this request goes through BentoML, Starlette and FastAPI
    # (which read `application/*+json` as JSON too).
    slow = httpx.post(models_server.url + path, content=json.dumps(body), timeout=60,
                      headers={"content-type": "application/vnd.test+json"})
    assert fast.status_code == slow.status_code, (fast.text, slow.text)
    assert fast.headers["content-type"] == slow.headers["content-type"]
    assert fast.headers["x-request-id"] and slow.headers["x-request-id"]
    fast_json, slow_json = fast.json(), slow.json()
    if isinstance(fast_json, dict):  # a response's own id and time differ by design
        for key in ("id", "created"):
            fast_json.pop(key, None), slow_json.pop(key, None)
    assert numbers_close(fast_json, slow_json), (fast.text[:500], slow.text[:500])
