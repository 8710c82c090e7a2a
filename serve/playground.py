"""The playground page at `/` (serve/page/: plain HTML, CSS and JavaScript, shipped with the package): a form
over the server's own routes for a person in a browser. Browsers get the page; API clients asking `/` for anything
but HTML keep getting the JSON 404 that names /docs. Nothing on the page is fetched from outside the server."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

FOLDER = Path(__file__).with_name("page")
PREFIX = "/playground"  # the page's script and stylesheet


def wants_html(accept: str | None) -> bool:
    """A browser's navigation asks for text/html first; fetch() and API clients ask for JSON or anything."""
    return bool(accept) and "text/html" in accept.split(",")[0].lower()


def add_routes(app: FastAPI) -> None:
    app.mount(PREFIX, StaticFiles(directory=FOLDER), name="playground")

    @app.get("/", include_in_schema=False)
    async def page(request: Request):
        if not wants_html(request.headers.get("accept")):
            raise HTTPException(404)  # the edge's JSON 404, as before the page existed
        return FileResponse(FOLDER / "index.html", media_type="text/html")
