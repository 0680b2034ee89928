"""The style and scripts of the service's pages (runners.api.pages), served at `/ui/<name>`: files of
their own, so the pages' Content-Security-Policy can forbid inline scripts. Python strings rather than
files on disk: the Bento (bentofile.yaml) and the wheel pack `runners/**/*.py`.

The scripts only add to what the server wrote: with JavaScript off, `/` still says what is served and
whether it is ready."""

from __future__ import annotations

KEY_STORAGE = "embed-rerank-api-key"  # sessionStorage: this tab only, gone when it closes

PAGE_CSS = """\
:root { color-scheme: light dark; --line: #8884; --ok: #1a7f37; --down: #cf222e; }
body { font: 15px/1.45 system-ui, sans-serif; margin: 0; }
main { max-width: 68rem; margin: 0 auto; padding: 1.5rem; }
h1 { margin: 0 0 .25rem; font-size: 1.6rem; }
h2 { margin: 1.75rem 0 .5rem; font-size: 1.15rem; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .3rem .6rem .3rem 0; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-weight: 600; }
code { font: 13px/1.4 ui-monospace, monospace; }
.health { display: inline-block; padding: .2rem .6rem; border-radius: .3rem; color: #fff; font-weight: 600; }
.health.ok { background: var(--ok); }
.health.down { background: var(--down); }
.note { color: GrayText; }
form { margin: .5rem 0; }
#viewer { margin: 0 -1.5rem; }
"""

# `/`: when API_KEY is set and the request had no key, the page lists no model; with JavaScript, a key
# typed here lists them from GET /v1/models (and the API viewer sends it too).
INDEX_JS = """\
(function () {
  "use strict";
  var form = document.getElementById("key-form");
  if (!form) return;
  var input = document.getElementById("key");
  var note = document.getElementById("key-note");
  var rows = document.querySelector("#models tbody");
  form.hidden = false;

  function cell(row, text) {
    var td = document.createElement("td");
    td.textContent = text;
    row.appendChild(td);
  }

  function show(models) {
    rows.textContent = "";
    models.forEach(function (m) {
      var row = document.createElement("tr");
      var code = document.createElement("code");
      var name = document.createElement("td");
      code.textContent = m.id;
      name.appendChild(code);
      row.appendChild(name);
      cell(row, m.kind || "");
      cell(row, (m.capabilities || []).join(", "));
      cell(row, m.dimensions == null ? "\\u2014" : String(m.dimensions));
      cell(row, String(m.max_tokens));
      cell(row, (m.outputs || []).join(", ") || "\\u2014");
      rows.appendChild(row);
    });
  }

  function load(key) {
    fetch("v1/models", { headers: { Authorization: "Bearer " + key } })
      .then(function (res) {
        return res.json().then(function (body) { return { ok: res.ok, body: body }; });
      })
      .then(function (answer) {
        if (!answer.ok) {
          sessionStorage.removeItem("__KEY__");
          note.textContent = answer.body.error ? answer.body.error.message : "the key was refused";
          return;
        }
        sessionStorage.setItem("__KEY__", key);
        note.textContent = "Listed with the key given (kept in this tab until it closes).";
        show(answer.body.data);
      })
      .catch(function (err) { note.textContent = "GET /v1/models failed: " + err; });
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    if (input.value) load(input.value);
  });
  var kept = sessionStorage.getItem("__KEY__");
  if (kept) load(kept);
})();
""".replace("__KEY__", KEY_STORAGE)

# `/docs`: Swagger UI (BentoML's package ships it) on /docs.json. No online validator badge (it loads an
# image from validator.swagger.io) and the base layout (the standalone one adds a top bar that fetches
# any URL typed in it); the key from `/`, if any, goes with every request it makes.
VIEWER_JS = """\
window.addEventListener("load", function () {
  "use strict";
  var key = sessionStorage.getItem("__KEY__");
  window.ui = SwaggerUIBundle({
    url: "docs.json",
    dom_id: "#viewer",
    layout: "BaseLayout",
    validatorUrl: null,
    deepLinking: true,
    requestInterceptor: function (request) {
      if (key) request.headers.Authorization = "Bearer " + key;
      return request;
    },
  });
});
""".replace("__KEY__", KEY_STORAGE)

ASSETS: dict[str, tuple[str, str]] = {  # name -> (media type, content)
    "page.css": ("text/css; charset=utf-8", PAGE_CSS),
    "index.js": ("text/javascript; charset=utf-8", INDEX_JS),
    "viewer.js": ("text/javascript; charset=utf-8", VIEWER_JS),
}
