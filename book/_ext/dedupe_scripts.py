"""Sphinx extension: include each page script once.

Under Jupyter Book 1, sphinx-thebe's ``env-before-read-docs`` handler runs
twice (once registered with filename ``None``, once with ``""``), so every
page declared ``const THEBE_JS_URL`` twice and the browser
reported "Identifier 'THEBE_JS_URL' has already been declared". This keeps
the first of identical script entries (same file or inline body, same
attributes), counting ``None`` and ``""`` alike.
"""

from __future__ import annotations


def _key(script) -> tuple:
  """Same file (None and "" both mean inline) and same attributes/body."""
  attrs = getattr(script, "attributes", {}) or {}
  name = getattr(script, "filename", script) or ""
  return (str(name), tuple(sorted((k, str(v)) for k, v in attrs.items())))


def _dedupe(app, pagename, templatename, context, doctree) -> None:
  scripts = context.get("script_files")
  if not scripts:
    return
  seen, kept = set(), []
  for script in scripts:
    key = _key(script)
    if key not in seen:
      seen.add(key)
      kept.append(script)
  scripts[:] = kept  # in place: the builder and later handlers share this list


def setup(app):
  # Late, after every handler that adds page scripts (MathJax is added here).
  app.connect("html-page-context", _dedupe, priority=900)
  return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
