"""The documentation stays a house a newcomer can carry on: a short README, links that lead somewhere,
every setting in the README. Reads files only (no server)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
README_LIMIT = 16_000  # characters, as `wc -m` counts them

FENCE = re.compile(r"^(```|~~~)")
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
# How settings code reads a variable: env.get("NAME", ...), _int(env, "NAME", ...), os.environ["NAME"], getenv("NAME").
ENV_READ = re.compile(r"""\b(?:env|environ)(?:\.get\(|\[|,)\s*["']([A-Z][A-Z0-9_]*)["']|\bgetenv\(\s*["']([A-Z][A-Z0-9_]*)["']""")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = text.replace("`", "").replace("*", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(path.read_text()):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    found = []
    for line in prose_lines(path.read_text()):
        found += LINK.findall(INLINE_CODE.sub(lambda m: "x" * len(m.group(0)), line))
    return found


def test_readme_is_a_landing_page():
    size = len(README.read_text(encoding="utf-8"))
    assert size <= README_LIMIT, f"README.md has {size} characters, more than {README_LIMIT}: move a section to docs/"


def test_docs_exist():
    assert {p.name for p in DOCS} >= {"api.md", "models.md", "deploy.md", "performance.md", "reliability.md",
                                      "development.md"}


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target}: no {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_slugs_as_github_makes_them():
    assert slug("`bentoml serve`") == "bentoml-serve"
    assert slug("`MAX_BATCH_TOKENS` defaults") == "max_batch_tokens-defaults"
    assert slug("Sparse and multi-vector embeddings: SPLADE, ColBERT, BGE-M3") == (
        "sparse-and-multi-vector-embeddings-splade-colbert-bge-m3")
    assert slug("GPU: NVIDIA H200") == "gpu-nvidia-h200"


def settings_read_from_environment() -> set[str]:
    files = [p for p in (ROOT / "runners").rglob("*.py") if p.stem == "settings" or "settings" in p.parent.parts]
    assert files, "no settings module under runners/"
    names = set()
    for path in files:
        for a, b in ENV_READ.findall(path.read_text()):
            names.add(a or b)
    return names


def test_every_setting_is_in_the_readme():
    names = settings_read_from_environment()
    # If this fails, the settings module reads its variables some other way: teach ENV_READ that way.
    assert len(names) >= 25 and {"MODEL_NAMES", "BATCH_SIZES", "API_KEY", "ALLOCATOR"} <= names, sorted(names)
    readme = README.read_text()
    missing = sorted(n for n in names if not re.search(rf"(?<![A-Z0-9_]){n}(?![A-Z0-9_])", readme))
    assert not missing, f"settings read from the environment but not in README.md: {missing}"
