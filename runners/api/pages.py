"""The service's own pages, answered by FrontDoor: `/` says what this server serves (models, their kind,
capabilities and dimensions; the routes) and whether it is ready; `/docs` is an API viewer of `/docs.json`.

Nothing on them comes from another host. BentoML's page at `/` loaded Google Tag Manager in every
visitor's browser (and waited on it where there is no internet); FastAPI's `/docs` pages load Swagger UI
from a CDN, so the mounted apps have none (runners.api.routes). The viewer is the Swagger UI that
BentoML's package ships, served from the installed package at `/ui/`; the pages' own style and scripts
are runners.api.page_assets. Their Content-Security-Policy lets the browser load nothing from elsewhere.

API_KEY: the pages are public, as health is (a browser cannot send a Bearer header when it opens a page),
but `/` lists the models only to a request that carries a key; otherwise it says where they are listed,
and with JavaScript a key typed there lists them from `GET /v1/models`. `/docs.json` needs the key as
before; the viewer sends the one typed on `/`.
"""

from __future__ import annotations

import functools
from html import escape
from pathlib import Path
from typing import Any

from starlette.responses import FileResponse, Response

from runners.api import tei
from runners.api.context import inference
from runners.api.page_assets import ASSETS
from runners.api.responses import HEALTH_PATHS, METRICS_PATHS, error_response
from runners.api.routes import MOUNTS, ROUTES, mount_of
from runners.errors import ModelNotFound, ServiceError

INDEX_PATH, VIEWER_PATH, ASSETS_PREFIX = "/", "/docs", "/ui/"
SWAGGER_FILES = ("swagger-ui.css", "swagger-ui-bundle.js")  # of BentoML's static_content, the two the viewer needs
SECURITY_HEADERS = {
    # 'unsafe-inline' styles only: Swagger UI sets style attributes; every script is a file of this server.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                               "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_MODEL_COLUMNS = ("Model", "Kind", "Capabilities", "Dimensions", "Max tokens", "Outputs")


def serves(path: str) -> bool:
    return path in (INDEX_PATH, VIEWER_PATH) or path.startswith(ASSETS_PREFIX)


async def page(path: str, authorized: bool, key_set: bool) -> Response:
    """The answer to `GET path` (`serves(path)`): `authorized` says the request carried a good key, or
    none is needed."""
    if path == INDEX_PATH:
        ready, state = await _health()
        models = _models() if authorized else None
        return _html(index_html(models, ready, state, key_set and not authorized))
    if path == VIEWER_PATH:
        return _html(VIEWER_HTML if swagger_folder() is not None else VIEWER_MISSING_HTML)
    return _asset(path[len(ASSETS_PREFIX):])


async def _health() -> tuple[bool, str]:
    """What `/readyz` and TEI's `/health` say: ready, or the reason not."""
    try:
        await tei.health({})
    except ServiceError as err:
        return False, err.message
    return True, "every model is loaded and serves"


def _models() -> list[dict[str, Any]]:
    try:
        return inference().models()["data"]
    except ServiceError:  # still starting: no model to list yet
        return []


def index_html(models: list[dict[str, Any]] | None, ready: bool, state: str, key_needed: bool) -> str:
    """`/`: `models` are /v1/models entries, None when they are not to be shown (API_KEY, no key given)."""
    title = f"embed-rerank: {'ready' if ready else 'not ready'}"
    if models is not None:
        title += f", {len(models)} model{'s' * (len(models) != 1)}"
    rows = "".join(_row(model) for model in models or ())
    if key_needed:
        listing = (
            '<p id="key-note" class="note">API_KEY is set: the models are listed with a key, '
            "<code>GET /v1/models</code> with <code>Authorization: Bearer &lt;key&gt;</code>.</p>\n"
            '<form id="key-form" hidden><label>API key <input id="key" type="password" autocomplete="off"></label> '
            "<button>List the models</button></form>\n"
        )
    elif not models:
        listing = f'<p class="note">No model is serving yet: {escape(state)}.</p>\n'
    else:
        listing = ""
    head = "".join(f"<th>{name}</th>" for name in _MODEL_COLUMNS)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="ui/page.css">
</head>
<body>
<main>
<h1>embed-rerank</h1>
<p>Embeddings, reranking and classification: native, OpenAI, Jina, Cohere and Text Embeddings Inference APIs.</p>
<h2>Health</h2>
<p><span id="health" class="health {'ok' if ready else 'down'}">{'Ready' if ready else 'Not ready'}</span>
<span id="health-detail">{escape(state)}</span> (<a href="readyz">/readyz</a>)</p>
<h2>Models</h2>
{listing}<table id="models">
<thead><tr>{head}</tr></thead>
<tbody>{rows}</tbody>
</table>
<h2>API</h2>
<p><a id="viewer-link" href="docs">API viewer</a> (served by this server) &middot;
<a href="docs.json">OpenAPI document</a> <code>/docs.json</code></p>
{_routes_table()}
</main>
<script src="ui/index.js"></script>
</body>
</html>
"""


def _row(model: dict[str, Any]) -> str:
    def dash(value: Any) -> str:
        return "&mdash;" if value in (None, [], "") else escape(str(value))

    return (f"<tr><td><code>{escape(model['id'])}</code></td><td>{dash(model.get('kind'))}</td>"
            f"<td>{escape(', '.join(model['capabilities']))}</td><td>{dash(model['dimensions'])}</td>"
            f"<td>{dash(model['max_tokens'])}</td><td>{dash(', '.join(model['outputs']))}</td></tr>")


@functools.cache
def _routes_table() -> str:
    """Every route of the table, by dialect, then health, metrics and the pages."""
    rows = [(route.method, route.path, MOUNTS.get(mount_of(route.path) or "", "Native routes")) for route in ROUTES]
    rows += [("GET", path, "Health (no key needed)") for path in HEALTH_PATHS]
    rows += [("GET", path, "Prometheus metrics") for path in METRICS_PATHS if all(path != route.path for route in ROUTES)]
    rows += [("GET", "/docs.json", "OpenAPI document"), ("GET", VIEWER_PATH, "API viewer"), ("GET", INDEX_PATH, "This page")]
    body = "".join(f"<tr><td>{method}</td><td><code>{escape(path)}</code></td><td>{escape(group)}</td></tr>"
                   for method, path, group in rows)
    head = "<thead><tr><th>Method</th><th>Path</th><th>API</th></tr></thead>"
    return f'<table id="routes">\n{head}\n<tbody>{body}</tbody>\n</table>'


VIEWER_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>embed-rerank: API viewer</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="ui/page.css">
<link rel="stylesheet" href="ui/swagger-ui.css">
</head>
<body>
<main>
<p><a href="./">&larr; embed-rerank</a> &middot; <a href="docs.json">OpenAPI document</a></p>
<noscript><p>The API viewer needs JavaScript: read <a href="docs.json">/docs.json</a> instead.</p></noscript>
<div id="viewer"></div>
</main>
<script src="ui/swagger-ui-bundle.js"></script>
<script src="ui/viewer.js"></script>
</body>
</html>
"""


VIEWER_MISSING_HTML = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>embed-rerank: API viewer</title><link rel="icon" href="data:,">
<link rel="stylesheet" href="ui/page.css"></head>
<body><main><p><a href="./">&larr; embed-rerank</a></p>
<p>This BentoML package ships no Swagger UI: read the OpenAPI document, <a href="docs.json">/docs.json</a>.</p>
</main></body>
</html>
"""


def _html(content: str) -> Response:
    return Response(content, media_type="text/html; charset=utf-8",
                    headers={**SECURITY_HEADERS, "Cache-Control": "no-store"})


def _asset(name: str) -> Response:
    headers = {**SECURITY_HEADERS, "Cache-Control": "public, max-age=3600"}
    if name in ASSETS:
        media_type, content = ASSETS[name]
        return Response(content, media_type=media_type, headers=headers)
    folder = swagger_folder()
    if name in SWAGGER_FILES and folder is not None:
        return FileResponse(folder / name, headers=headers)
    return error_response(ModelNotFound(f"no such route: {ASSETS_PREFIX}{name}", code="not_found"))


@functools.cache
def swagger_folder() -> Path | None:
    """The Swagger UI files in BentoML's installed package (its old index page's), or None without them."""
    from bentoml._internal import server

    folder = Path(server.__file__).parent / "static_content"
    return folder if all((folder / name).is_file() for name in SWAGGER_FILES) else None
