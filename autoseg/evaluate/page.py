"""What autoseg's self-contained HTML pages share: the results page of ``autoseg_evaluate --report``
(``autoseg.evaluate.report``) and the review page of ``autoseg_predict --report`` (``autoseg.api.predict_report``).

A page is one file that opens in any browser, offline: the CSS is inline, every picture is a base64 PNG data URI, there
is no script, and a Content-Security-Policy forbids the page anything else (no fetch, no font, no frame), so the only
references it holds are relative links to the files it was made from. Values are HTML-escaped where they are put in.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

from autoseg.io.files import atomic_path

#: Pictures only as data URIs, styles only inline; nothing else may load.
CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def escape(value: Any) -> str:
    """``str(value)`` with ``& < > " '`` escaped, for text and attribute values alike."""
    return html.escape(str(value), quote=True)


def data_uri(png: bytes) -> str:
    """A PNG as a ``data:image/png;base64,...`` URI, for ``<img src>``."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def relative_link(target: Path, page_dir: Path) -> str:
    """The URL of ``target`` relative to the folder the page is written to (symbolic links resolved), percent-encoded."""
    return quote(Path(os.path.relpath(target.resolve(), page_dir.resolve())).as_posix())


def timestamp(now: datetime | None = None) -> str:
    """The time a page was made, as printed on it: ``2026-12-07 14:03 UTC`` (default: now, UTC)."""
    return (now or datetime.now(timezone.utc)).strftime("%Y-%m-%d %H:%M %Z").strip()


def table(css_class: str, header: Sequence[str], rows: Sequence[str]) -> str:
    """A table with one header row and the given ``<tr>`` rows, scrolling sideways where the page is too narrow."""
    head = "".join(f"<th>{escape(cell)}</th>" for cell in header)
    return (f'<div class="scroll"><table class="{css_class}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')  # fmt: skip


def definitions(rows: Sequence[tuple[str, Any]], css_class: str | None = None) -> str:
    """A ``<dl>`` of (name, value) pairs, both escaped."""
    attribute = f' class="{css_class}"' if css_class else ""
    return (
        f"<dl{attribute}>"
        + "".join(f"<dt>{escape(name)}</dt><dd>{escape(value)}</dd>" for name, value in rows)
        + "</dl>"
    )


def tiles(items: Sequence[tuple[str, str, str]]) -> str:
    """The numbers people ask for first, as tiles: (label, value as HTML, note) each; label and note are escaped."""
    return '<div class="tiles">' + "".join(
        f'<div class="tile"><div class="label">{escape(label)}</div><div class="value">{value}</div>'
        f'<div class="note">{escape(note)}</div></div>' for label, value, note in items) + "</div>"  # fmt: skip


def document(title: str, body: Sequence[str], stamp: str, style: str = "") -> str:
    """The whole page: ``body`` (HTML fragments, in order) inside ``<main>``, the shared :data:`STYLE` plus ``style``,
    the Content-Security-Policy, and a footer with ``stamp``."""
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{STYLE}{style}</style></head><body><main>",
        *body, f"<footer>autoseg · {escape(stamp)}</footer></main></body></html>", "",
    ])  # fmt: skip


def write_page(text: str, path: Path) -> Path:
    """Write a page atomically (an error leaves nothing under ``path``); return ``path``.

    Raises:
        DiskFullError: the disk filled up while writing it.
    """
    with atomic_path(path, suffix=".html") as temporary:
        temporary.write_text(text, encoding="utf-8")
    return path


STYLE = """
:root { --ink: #1d2330; --muted: #5b6475; --line: #dfe3ea; --panel: #f6f7f9; --accent: #2458a6; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       background: #fff; }
main { max-width: 1280px; margin: 0 auto; padding: 24px 28px 40px; }
h1 { font-size: 26px; margin: 0 0 8px; } h2 { font-size: 20px; margin: 34px 0 8px; border-bottom: 2px solid var(--line);
   padding-bottom: 4px; } h3 { font-size: 15px; margin: 0 0 6px; display: flex; gap: 8px; align-items: center; }
a { color: var(--accent); text-decoration: none; } a:hover { text-decoration: underline; }
code { background: var(--panel); padding: 0 4px; border-radius: 3px; }
dl.inputs { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 8px 0; color: var(--muted); }
dl.inputs dt { font-weight: 600; } dl.inputs dd { margin: 0; font-family: ui-monospace, monospace; font-size: 13px;
   overflow-wrap: anywhere; }
nav { margin-top: 10px; font-weight: 600; }
.tiles { display: grid; grid-template-columns: repeat(auto-fit, minmax(190px, 1fr)); gap: 12px; margin: 22px 0 0; }
.tile { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px; }
.tile .label { color: var(--muted); font-size: 13px; } .tile .value { font-size: 28px; font-weight: 700; }
.tile .note { color: var(--muted); font-size: 12px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; font-size: 14px; }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--line); text-align: right; vertical-align: top; }
thead th { background: var(--panel); font-weight: 600; position: sticky; top: 0; }
tbody th { text-align: left; font-weight: 500; } tbody tr:hover { background: #f0f4fb; }
.ci { color: var(--muted); font-size: 12px; white-space: nowrap; } tr.extra th { font-style: italic; }
img.plot { max-width: 560px; width: 100%; border: 1px solid var(--line); border-radius: 6px; }
.ref { color: #0a8a0a; font-weight: 700; } .pred { color: #d01010; font-weight: 700; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(440px, 1fr)); gap: 14px; margin-top: 16px; }
.case { border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; background: #fff; }
.case dl { display: grid; grid-template-columns: max-content 1fr; gap: 0 10px; margin: 0 0 8px; font-size: 13px; }
.case dt { color: var(--muted); } .case dd { margin: 0; font-variant-numeric: tabular-nums; }
.case img { display: block; max-width: 100%; height: auto; margin: 0 auto; border-radius: 4px; }
.rank { color: var(--muted); font-weight: 400; }
.badge { margin-left: auto; border-radius: 10px; padding: 1px 9px; font-size: 13px; color: #fff; white-space: nowrap; }
.badge.good { background: #2e8540; } .badge.fair { background: #c98a00; } .badge.poor { background: #c0392b; }
footer { margin-top: 36px; color: var(--muted); font-size: 12px; }
"""
