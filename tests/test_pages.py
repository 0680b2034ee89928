"""The service's own pages (runners/api/pages.py) in headless Chromium against a real server: every request
the browser makes is recorded (its net log) and none of the page's goes to another host; `/` says what is
served and whether it is ready, with JavaScript and without; the API viewer renders /docs.json's routes.

The browser opens the server as `embed-rerank.test` (mapped to 127.0.0.1, every other name unresolvable):
Swagger UI's online validator badge, for one, stays away from `localhost` and `127.0.0.1` URLs only.
Chromium is installed by `make install-test` (as root); in CI (CI=true) a missing one fails the tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from runners.api.front_door import FrontDoor
from runners.api.pages import index_html

HOST = "embed-rerank.test"
# Browser flags: no first-run, sync, extension or component traffic of the browser's own where flags stop it.
QUIET = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-default-apps",
         "--disable-extensions", "--disable-domain-reliability", "--disable-client-side-phishing-detection",
         "--disable-features=NetworkTimeServiceQuerying,OptimizationHints,MediaRouter,Translate",
         f"--host-resolver-rules=MAP {HOST} 127.0.0.1, MAP * ~NOTFOUND"]
# Hosts that a page phoning home would reach: none may appear in the net log at all, whoever asked.
TRACKERS = ("googletagmanager", "google-analytics", "jsdelivr", "unpkg", "cdnjs", "fonts.googleapis", "swagger.io")


def chromium() -> str:
    found = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if found is None:
        reason = "chromium is not installed: `make install-test` as root installs it (apt-get install chromium)"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


@dataclass
class Request:
    url: str
    initiator: str
    isolation_key: str  # network isolation key: the top frame's site the request was made for

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""


@dataclass
class Visit:
    dom: str
    requests: list[Request]

    def page_requests(self, site: str) -> list[Request]:
        """The requests made for the page: its navigation and everything it loads carry its site in their
        network isolation key. The others are the browser's own (update checks, account lookups)."""
        return [r for r in self.requests if site in r.isolation_key or r.initiator.startswith(site)]


def visit(url: str, tmp_path: Path, script: bool = True) -> Visit:
    net_log = tmp_path / "net.json"
    argv = [chromium(), *QUIET, f"--user-data-dir={tmp_path / 'profile'}", f"--log-net-log={net_log}",
            "--virtual-time-budget=10000", "--dump-dom", url]
    if not script:  # as a user turns it off (--blink-settings=scriptEnabled=false would leave --dump-dom empty)
        preferences = tmp_path / "profile" / "Default" / "Preferences"
        preferences.parent.mkdir(parents=True)
        preferences.write_text(json.dumps({"profile": {"default_content_setting_values": {"javascript": 2}}}))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return Visit(done.stdout, net_requests(net_log))


def net_requests(path: Path) -> list[Request]:
    text = path.read_text()
    try:
        log = json.loads(text)
    except ValueError:  # a browser that stopped before closing the log leaves its last event open
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [Request(p["url"], str(p.get("initiator", "")), str(p.get("network_isolation_key", "")))
            for event in log["events"] if event["type"] == start_job for p in [event.get("params", {})] if "url" in p]


def assert_stays_home(seen: Visit, site: str) -> list[Request]:
    # What the page refers to: the Content-Security-Policy would stop a request to another host before the
    # net log saw it.
    elsewhere = [url for url in re.findall(r'\ssrc="([^"]*)"', seen.dom) if urlsplit(url).hostname not in (None, HOST)]
    assert not elsewhere
    assert not [r.url for r in seen.requests if any(t in r.host for t in TRACKERS)]
    mine = seen.page_requests(site)
    assert mine, "no request of the page was recorded"
    assert {r.host for r in mine} == {HOST}, [r.url for r in mine if r.host != HOST]
    return mine


@pytest.fixture(scope="module")
def site(start_server) -> str:
    """A server of its own: the page says how the server is (ready, its models), whatever other tests did
    to a shared one."""
    chromium()
    server = start_server({"MODEL_WARMUP": "true"})
    return f"http://{HOST}:{server.port}"


def text_of(dom: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}"[^>]*>(.*?)</', dom, re.S)
    assert match, f"no #{element_id} in the page"
    return match.group(1)


@pytest.mark.parametrize("script", [False, True], ids=["javascript-off", "javascript-on"])
def test_index_says_what_is_served(site, tmp_path, script):
    seen = visit(site + "/", tmp_path, script)
    mine = assert_stays_home(seen, "http://" + HOST)
    title = re.search(r"<title>(.*?)</title>", seen.dom, re.S)
    assert title and title.group(1) == "embed-rerank: ready, 1 model", title and title.group(1)
    assert text_of(seen.dom, "health") == "Ready"
    row = re.search(r"<tr><td><code>all-MiniLM-L6-v2</code></td>(.*?)</tr>", seen.dom)
    assert row, seen.dom[:3000]
    assert re.findall(r"<td>(.*?)</td>", row.group(1)) == ["embed", "embed, rerank", "384", "256", "dense, tokens"]
    assert 'href="docs"' in seen.dom and 'href="docs.json"' in seen.dom
    assert "<code>/v2/rerank</code>" in seen.dom and "<code>/tei/embed</code>" in seen.dom
    loaded = {urlsplit(r.url).path for r in mine}
    assert ("/ui/index.js" in loaded) is script and "/ui/page.css" in loaded


def test_api_viewer_renders_the_routes_of_docs_json(site, default_server, tmp_path):
    seen = visit(site + "/docs", tmp_path)
    mine = assert_stays_home(seen, "http://" + HOST)
    assert {"/docs", "/docs.json", "/ui/swagger-ui-bundle.js", "/ui/viewer.js"} <= {urlsplit(r.url).path for r in mine}
    assert "<title>embed-rerank: API viewer</title>" in seen.dom
    documented = set(httpx.get(default_server.url + "/docs.json").json()["paths"])
    rendered = set(re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', seen.dom))
    assert documented and rendered == documented, documented ^ rendered


def test_no_ui_of_the_frameworks_left(default_server):
    url = default_server.url
    index = httpx.get(url + "/")
    assert index.status_code == 200 and "googletagmanager" not in index.text and "GTM-" not in index.text
    assert "default-src 'self'" in index.headers["content-security-policy"]
    for path in ("/docs", "/ui/swagger-ui-bundle.js", "/ui/viewer.js", "/ui/page.css"):
        res = httpx.get(url + path)
        assert res.status_code == 200 and "googletagmanager" not in res.text, path
    # FastAPI's own docs pages of the mounted apps load Swagger UI and ReDoc from a CDN: gone.
    for path in ("/v1/docs", "/v1/redoc", "/v2/docs", "/v2/redoc", "/ui/index.css", "/ui/../service.py"):
        assert httpx.get(url + path).status_code == 404, path
    assert httpx.head(url + "/").status_code == 200


def _get(door: FrontDoor, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=door), base_url="http://test") as client:
            return await client.get(path, headers=headers)

    res = asyncio.run(go())
    return res.status_code, res.text


async def _inner(scope, receive, send) -> None:  # BentoML's app below FrontDoor: never reached by the pages
    raise AssertionError(f"{scope['path']} went past FrontDoor")


def test_api_key_keeps_the_models_off_the_page() -> None:
    door = FrontDoor(_inner, api_keys=("k1",), metrics_public=True, max_body_bytes=1000)
    status, body = _get(door, "/")
    assert status == 200 and "API_KEY is set" in body and 'id="key-form" hidden' in body
    status, body = _get(door, "/", {"Authorization": "Bearer k1"})
    assert status == 200 and "API_KEY is set" not in body and "No model is serving yet" in body
    assert _get(door, "/docs")[0] == 200


def test_index_html_escapes_and_hides() -> None:
    model = {"id": "<b>x</b>", "kind": "embed", "capabilities": ["embed"], "dimensions": None, "max_tokens": 8,
             "outputs": []}
    shown = index_html([model], True, "ok", key_needed=False)
    assert "<code>&lt;b&gt;x&lt;/b&gt;</code>" in shown and "<b>x</b>" not in shown
    hidden = index_html(None, False, "the models are still loading", key_needed=True)
    assert "&lt;b&gt;" not in hidden and "Not ready" in hidden and "<title>embed-rerank: not ready</title>" in hidden


def test_chromium_missing_fails_in_ci_and_skips_elsewhere(monkeypatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="make install-test"):
        chromium()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        chromium()
