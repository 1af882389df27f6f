"""The web page that ``taer serve`` serves at ``/``: static HTML, CSS and plain JavaScript shipped in
the package (no build step, nothing from a CDN). It reads everything it shows from the API
(``/v1/taer/*``, ``/metrics``, ``/v1/chat/completions``) with the API key the user types in, so
the page itself is public and holds no data.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
PAGE_PATH = "/"
ASSETS_PATH = "/ui"
# Only this origin's scripts, styles and API: a page that shows an API key's data loads nothing else.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def is_page_path(path: str) -> bool:
    """The page and its files, which need no API key (they hold no data)."""
    return path == PAGE_PATH or path.startswith(ASSETS_PATH + "/")


def add_page_routes(app: FastAPI) -> None:
    @app.get(PAGE_PATH, include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=_HEADERS)

    app.mount(ASSETS_PATH, StaticFiles(directory=STATIC_DIR), name="ui")
