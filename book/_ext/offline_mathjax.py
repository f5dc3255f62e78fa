"""Sphinx extension: serve MathJax from a local copy, so maths renders offline.

Sphinx loads MathJax from a CDN by default; an offline reader (or the browser
test in CI) then sees raw ``\\(...\\)``. This extension copies the parts of
the npm ``mathjax`` package that the page needs (pinned in
``tools/package.json``; ``make setup`` runs ``npm ci`` there) into the
build's ``_static/mathjax/`` and points ``mathjax_path`` at it.

Without ``tools/node_modules/mathjax`` the book still builds and uses the CDN
(a log line says so). ``DATAWEIGHTS_REQUIRE_OFFLINE_MATHJAX=1`` (set by
``make test``) turns that into a build error.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sphinx.errors import ConfigError
from sphinx.util import logging

logger = logging.getLogger(__name__)

ENTRY = "tex-mml-chtml.js"
# The combined component and what it may load at run time: fonts, TeX
# extensions autoloaded by macros, the menu and accessibility components.
PARTS = (ENTRY, "output/chtml/fonts/woff-v2", "input/tex/extensions", "ui",
         "a11y", "adaptors")


def _source(confdir: Path) -> Path | None:
  for root in (confdir, *confdir.parents):
    es5 = root / "tools" / "node_modules" / "mathjax" / "es5"
    if (es5 / ENTRY).is_file():
      return es5
  return None


def _stage(es5: Path, dest: Path) -> None:
  if dest.exists():
    shutil.rmtree(dest)
  for part in PARTS:
    src = es5 / part
    if src.is_dir():
      shutil.copytree(src, dest / part)
    else:
      (dest / part).parent.mkdir(parents=True, exist_ok=True)
      shutil.copyfile(src, dest / part)


def _configure(app, config) -> None:
  es5 = _source(Path(app.confdir))
  if es5 is None:
    msg = ("offline MathJax not found (tools/node_modules/mathjax); run `npm ci` in "
           "tools/ (make setup does) — the book will load MathJax from a CDN")
    if os.environ.get("DATAWEIGHTS_REQUIRE_OFFLINE_MATHJAX") == "1":
      raise ConfigError(msg)
    logger.info(msg)
    return
  staging = Path(app.outdir).parent / ".mathjax-static"
  _stage(es5, staging / "mathjax")
  config.html_static_path = [*config.html_static_path, str(staging)]
  config.mathjax_path = f"mathjax/{ENTRY}"
  logger.info(f"MathJax served offline from {es5}")


def setup(app):
  app.connect("config-inited", _configure)
  return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
