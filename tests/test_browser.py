"""The built book as a reader sees it, in headless Chromium.

Run after the strict build (``make test`` does, as its last step). Every HTML
page of ``_build/html`` is served on localhost and opened in Chromium, which
must show:

- every ``<img>`` loaded (``naturalWidth > 0``), and on each chapter page one
  image per published figure, byte-identical to ``book/results/<chapter>/``;
- every piece of maths typeset by MathJax, served from the book itself (no
  network: the CI machine has none);
- no internal link to a missing page or anchor, and no failed request.

A screenshot of every page at 1280 px wide goes to ``_build/screenshots/``
(``make test`` keeps them; look at them).

Without Chromium and chromedriver (Debian packages ``chromium`` and
``chromium-driver``; ``.ci/run`` installs them) these tests skip with a
message; under ``CI=true`` that is a failure.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from dataweights.experiments.registry import REGISTRY

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
WIDTH = 1280


def _skip_or_fail(why: str):
  if os.environ.get("CI", "").lower() == "true":
    pytest.fail(why)
  pytest.skip(why)


def _executable(env: str, *names: str) -> str | None:
  for cand in (os.environ.get(env), *names):
    if cand and (path := shutil.which(cand)):
      return path
  return None


class _Quiet(http.server.SimpleHTTPRequestHandler):
  def log_message(self, *args):
    pass


@pytest.fixture(scope="module")
def server():
  """Serves ``root`` (default ``_build/html``) on localhost; yields its URL."""
  roots = {}

  def serve(root: Path = HTML) -> str:
    if root not in roots:
      handler = functools.partial(_Quiet, directory=str(root))
      httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
      threading.Thread(target=httpd.serve_forever, daemon=True).start()
      roots[root] = httpd
    return f"http://127.0.0.1:{roots[root].server_address[1]}/"

  yield serve
  for httpd in roots.values():
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
  chromium = _executable("CHROMIUM", "chromium", "chromium-browser", "google-chrome")
  driver_bin = _executable("CHROMEDRIVER", "chromedriver")
  if not chromium or not driver_bin:
    _skip_or_fail("headless Chromium is not installed (Debian: apt-get install chromium "
                  "chromium-driver); the browser checks of the built book did not run")
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service

  opts = webdriver.ChromeOptions()
  opts.binary_location = chromium
  # No network beyond localhost: keep Chromium from phoning home.
  for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--disable-quic", "--hide-scrollbars",
               f"--window-size={WIDTH},1000",
               f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
    opts.add_argument(flag)
  opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
  driver = webdriver.Chrome(options=opts, service=Service(executable_path=driver_bin))
  driver.set_page_load_timeout(60)
  driver.set_script_timeout(60)
  yield driver
  driver.quit()


class _Ids(HTMLParser):
  def __init__(self):
    super().__init__()
    self.ids: set[str] = set()

  def handle_starttag(self, tag, attrs):
    for k, v in attrs:
      if k in ("id", "name") and v:
        self.ids.add(v)


@functools.cache
def _anchors(url: str) -> frozenset[str] | None:
  """The ids of a served page, or None if it does not load."""
  try:
    with urllib.request.urlopen(url, timeout=10) as r:
      text = r.read().decode("utf-8", "replace")
  except OSError:
    return None
  p = _Ids()
  p.feed(text)
  return frozenset(p.ids)


_MATH_WAIT = """
const done = arguments[arguments.length - 1];
const mj = window.MathJax;
if (mj && mj.startup && mj.startup.promise) {
  mj.startup.promise.then(() => done('typeset'), (e) => done('error: ' + e));
} else { done(document.querySelector('.math') ? 'no MathJax' : 'no maths'); }
"""

_PAGE_FACTS = """
const imgs = Array.from(document.images).map(i => [i.currentSrc || i.src, i.complete, i.naturalWidth]);
const maths = Array.from(document.querySelectorAll('span.math, div.math'));
const raw = maths.filter(m => !m.querySelector('mjx-container')).map(m => m.textContent.slice(0, 60));
const links = Array.from(document.querySelectorAll('a[href]')).map(a => a.href);
return {imgs: imgs, n_math: maths.length, raw_math: raw, links: links,
        height: document.documentElement.scrollHeight};
"""


def check_page(driver, url: str, shot: Path | None = None) -> tuple[list[str], dict]:
  """Opens ``url``; returns (problems a reader would see, page facts)."""
  driver.get_log("browser")  # drop earlier pages' messages
  driver.set_window_size(WIDTH, 1000)
  driver.get(url)
  problems = []
  state = driver.execute_async_script(_MATH_WAIT)
  facts = driver.execute_script(_PAGE_FACTS)
  for src, complete, width in facts["imgs"]:
    if not (complete and width > 0):
      problems.append(f"image not loaded: {src}")
  if facts["n_math"] and state != "typeset":
    problems.append(f"{facts['n_math']} maths elements but MathJax: {state}")
  for text in facts["raw_math"]:
    problems.append(f"maths not typeset: {text!r}")
  origin = urllib.parse.urlsplit(url)
  for href in facts["links"]:
    parts = urllib.parse.urlsplit(href)
    if (parts.scheme, parts.netloc) != (origin.scheme, origin.netloc):
      continue
    target = urllib.parse.urlunsplit((*parts[:3], "", ""))
    ids = _anchors(target)
    if ids is None:
      problems.append(f"broken link: {href}")
    elif parts.fragment and urllib.parse.unquote(parts.fragment) not in ids:
      problems.append(f"broken anchor: {href}")
  for entry in driver.get_log("browser"):
    if entry["level"] == "SEVERE":
      problems.append(f"console: {entry['message'][:200]}")
  if shot is not None:
    driver.set_window_size(WIDTH, min(max(facts["height"], 600), 20000))
    shot.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(shot))
  return problems, facts


def _pages() -> list[Path]:
  if not (HTML / "index.html").exists():
    _skip_or_fail(f"{HTML} is not built: run `dataweights build` first")
  skip = {"_static", "_sources", "_images", "_sphinx_design_static"}
  return sorted(p for p in HTML.rglob("*.html") if not skip & set(p.relative_to(HTML).parts))


def test_every_page_shows_its_images_maths_and_links(browser, server):
  base = server()
  problems = {}
  for page in _pages():
    rel = page.relative_to(HTML).as_posix()
    shot = SHOTS / (rel.replace("/", "__").removesuffix(".html") + ".png")
    bad, _ = check_page(browser, base + rel, shot)
    if bad:
      problems[rel] = bad
  assert not problems, "what a reader would see:\n" + "\n".join(
    f"{page}: {p}" for page, ps in problems.items() for p in ps)


def test_each_chapter_page_shows_every_published_figure(browser, server):
  base = server()
  _pages()
  by_chapter: dict[str, list[str]] = {}
  for name, entry in REGISTRY.items():
    if entry.plot is not None:
      by_chapter.setdefault(entry.chapter, []).append(name)
  assert by_chapter, "no figures are registered"
  for chapter, names in sorted(by_chapter.items()):
    rel = f"book/{chapter}.html"
    assert (HTML / rel).exists(), f"{rel} was not built"
    _, facts = check_page(browser, base + rel)
    loaded = set()
    for src, complete, width in facts["imgs"]:
      path = HTML / urllib.parse.unquote(urllib.parse.urlsplit(src).path.lstrip("/"))
      if complete and width > 0 and path.is_file():
        loaded.add(path.read_bytes())
    for name in names:
      png = (ROOT / "book" / "results" / chapter / f"{name}.png").read_bytes()
      assert png in loaded, f"{rel} does not show the published {name}.png as a loaded image"


def test_the_checks_fail_on_a_broken_page(browser, server, tmp_path):
  """Self-test: a missing image, a broken link and untypeset maths are seen."""
  (tmp_path / "ok.html").write_text("<html><body><p id='here'>ok</p></body></html>")
  (tmp_path / "bad.html").write_text(
    "<html><body><img src='missing.png'>"
    "<a href='ok.html#here'>fine</a> <a href='nowhere.html'>gone</a> <a href='ok.html#nope'>x</a>"
    "<span class='math notranslate nohighlight'>\\(x^2\\)</span></body></html>")
  bad, _ = check_page(browser, server(tmp_path) + "bad.html")
  text = "\n".join(bad)
  assert "image not loaded" in text and "missing.png" in text
  assert "broken link" in text and "nowhere.html" in text
  assert "broken anchor" in text and "#nope" in text and "#here" not in text
  assert "MathJax: no MathJax" in text and "maths not typeset" in text
