"""The documentation: every Python example in README.md and docs/ runs (a page's examples in
order, as one program, under `mpiexec -n N` where its first example says `# launch: mpiexec -n N`);
the site builds with Sphinx, warnings as errors; no internal link or image is broken; and
headless Chromium renders the index, a guide, the API reference and a search."""
import html.parser
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from conftest import ROOT, run_mpi

DOCS = ROOT / "docs"
PAGES = sorted([ROOT / "README.md"] + [p for p in DOCS.rglob("*.md") if "_build" not in p.parts])
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
LAUNCH = re.compile(r"^# launch: mpiexec -n (\d+)$", re.M)


def examples(page):
    return FENCE.findall(page.read_text())


PAGES_WITH_EXAMPLES = [p for p in PAGES if examples(p)]


def test_pages_with_examples_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES_WITH_EXAMPLES}
    assert {"README.md", "docs/getting-started.md", "docs/guides/memory.md"} <= names, names


@pytest.mark.parametrize("page", PAGES_WITH_EXAMPLES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_examples_run(page, tmp_path):
    blocks = examples(page)
    launch = LAUNCH.search(blocks[0])
    script = tmp_path / "page.py"
    script.write_text("\n\n".join(blocks))
    proc = run_mpi(int(launch.group(1)) if launch else 1, script, timeout=600)
    assert proc.returncode == 0, f"{page.name}'s examples failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site built into a temporary folder (the user's docs/_build is left alone)."""
    pytest.importorskip("sphinx", reason="the docs' tools are installed by `make setup-docs`")
    out = tmp_path_factory.mktemp("html")
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b",
                           "html", str(DOCS), str(out)], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)
    assert proc.returncode == 0, f"sphinx failed:\n{proc.stdout}\n{proc.stderr}"
    return out


class _Links(html.parser.HTMLParser):
    """The links, image sources and element ids of one page."""

    def __init__(self):
        super().__init__()
        self.links, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("name"):
            self.ids.add(attrs["name"])
        for key in ("href", "src"):
            if attrs.get(key) and not (tag == "link" and key == "href" and
                                       attrs.get("rel") in ("canonical",)):
                self.links.append(attrs[key])


def _parse(path):
    parser = _Links()
    parser.feed(path.read_text(errors="replace"))
    return parser


def test_site_builds_with_every_page(site):
    pages = {p.relative_to(site).as_posix() for p in site.rglob("*.html")}
    for md in DOCS.rglob("*.md"):
        if "_build" in md.parts:
            continue
        assert md.relative_to(DOCS).with_suffix(".html").as_posix() in pages, md
    assert (site / "searchindex.js").stat().st_size > 10_000


def test_no_broken_internal_link(site):
    parsed = {p: _parse(p) for p in site.rglob("*.html")}
    broken = []
    for page, links in parsed.items():
        for link in links.links:
            parts = urlsplit(link)
            if parts.scheme or link.startswith("//") or link.startswith("mailto:"):
                continue
            target = page if not parts.path else (page.parent / unquote(parts.path)).resolve()
            if not target.exists():
                broken.append(f"{page.relative_to(site)}: {link}")
            elif parts.fragment and target.suffix == ".html":
                ids = parsed[target].ids if target in parsed else _parse(target).ids
                if unquote(parts.fragment) not in ids:
                    broken.append(f"{page.relative_to(site)}: {link} (no such anchor)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no Chromium (Debian's package is installed by `make setup-docs`)")


@pytest.fixture(scope="module")
def served(site):
    """The site on an HTTP server on localhost, as a reader's browser would load it."""
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _render(url, tmp_path):
    """The DOM headless Chromium built for `url`, after its scripts ran."""
    cmd = [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=15000", "--dump-dom", url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HOME=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _text(dom):
    body = re.sub(r"<script.*?</script>|<style.*?</style>", "", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body))


@pytest.mark.parametrize("page, title, words", [
    ("index.html", "pnode_dist", "reverse-accurate"),
    ("guides/memory.html", "Memory and checkpointing", "binomial"),
    ("api.html", "API reference", "Parameters"),
])
def test_browser_renders_page(served, tmp_path, page, title, words):
    dom = _render(f"{served}/{page}", tmp_path)
    found = re.search(r"<title>(.*?)</title>", dom, re.S)
    assert found and title in found.group(1), found
    text = _text(dom)
    assert len(text) > 2000 and words in text, text[:500]


def test_browser_search_finds_pages(served, tmp_path):
    dom = _render(f"{served}/search.html?q=checkpointing", tmp_path)
    results = re.findall(r'<li[^>]*>\s*<a href="([^"]+)"', dom.split('id="search-results"', 1)[-1])
    assert any("memory" in r for r in results), results
