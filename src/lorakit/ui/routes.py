"""`lorakit ui`: the web page (runs, chat, compare) on the same app and port as `lorakit serve`.

The page is plain files (page/: HTML, CSS, JS, no build step, nothing fetched from
elsewhere), served without the API key since they hold no data. Everything the page shows comes
from key-protected JSON: the OpenAI-compatible /v1 routes for chat and compare, and read-only
routes over the runs folder:

    GET /ui/api/info                          the served model, whether a runs folder is set
    GET /ui/api/runs                          run and sweep folders with their summaries
    GET /ui/api/run?path=REL                  one run: status, config, samples, final numbers
    GET /ui/api/metrics?path=REL&after=N      metric rows after the first N (polled while live)

REL is a path relative to --runs, checked by `runs.resolve_run` (no escape from the folder).
"""

# no `from __future__ import annotations`: FastAPI reads the routes' annotations (Request),
# imported inside page_routes, at run time
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError
from lorakit.serve import serve_main
from lorakit.serve.protocol import ApiError
from lorakit.ui.runs import list_runs, metrics_since, run_details
from lorakit.version import __version__

PAGE = Path(__file__).parent / "page"
PAGE_FILES = {
    "index.html": "text/html; charset=utf-8",
    "ui.css": "text/css; charset=utf-8",
    "ui.js": "text/javascript; charset=utf-8",
    "chat.js": "text/javascript; charset=utf-8",
    "chart.js": "text/javascript; charset=utf-8",
}
OPEN_PATHS = frozenset({"/", "/ui", "/ui/", *(f"/ui/{name}" for name in PAGE_FILES)})
# the page runs only its own scripts and talks only to this server
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def page_routes(runs_root: Path | None):
    """A function that adds the page's files and the runs routes to a FastAPI app."""
    from fastapi import Request
    from fastapi.responses import RedirectResponse, Response
    from starlette.concurrency import run_in_threadpool

    def extend(app: Any) -> None:
        @app.get("/", include_in_schema=False)
        @app.get("/ui", include_in_schema=False)
        async def home() -> RedirectResponse:
            return RedirectResponse("/ui/")

        @app.get("/ui/")
        async def index() -> Response:
            return _page_file("index.html")

        @app.get("/ui/api/info")
        async def info() -> dict:
            state = app.state.lorakit
            return {
                "version": __version__,
                "runs": runs_root is not None,
                "runs_folder": str(runs_root) if runs_root is not None else None,
                "model": state.host.base_name if state is not None else None,
                "adapter_loading": bool(state is not None and state.allow_runtime_loading),
            }

        @app.get("/ui/api/runs")
        async def runs() -> dict:
            return {"runs": await run_in_threadpool(list_runs, _root(runs_root))}

        @app.get("/ui/api/run")
        async def run(request: Request) -> dict:
            path = _query(request, "path")
            return await run_in_threadpool(_answer, run_details, _root(runs_root), path)

        @app.get("/ui/api/metrics")
        async def metrics(request: Request) -> dict:
            path, after = _query(request, "path"), _query(request, "after", "0")
            if not after.isdigit():
                raise ApiError(400, f"after={after!r}: expected a row count >= 0", "after")
            root = _root(runs_root)
            return await run_in_threadpool(_answer, metrics_since, root, path, int(after))

        @app.get("/ui/{name}")
        async def page_file(name: str) -> Response:
            return _page_file(name)

    return extend


def _page_file(name: str) -> Any:
    from fastapi.responses import Response

    if name not in PAGE_FILES:
        raise ApiError(404, f"no page file {name!r}; the page is at /ui/", code="unknown_url")
    body = (PAGE / name).read_bytes()
    return Response(body, media_type=PAGE_FILES[name], headers=HEADERS)


def _root(runs_root: Path | None) -> Path:
    if runs_root is None:
        raise ApiError(404, "no runs folder: start lorakit ui with --runs DIR", code="no_runs")
    return runs_root


def _query(request: Any, name: str, default: str | None = None) -> str:
    value = request.query_params.get(name, default)
    if value is None:
        raise ApiError(400, f"the query parameter `{name}` is missing", name)
    return value


def _answer(reader: Any, *args: Any) -> dict:
    """A runs reader's answer, its refusals turned into 400 / 404 API errors."""
    try:
        return reader(*args)
    except ConfigError as error:
        raise ApiError(400, str(error), "path") from None
    except FileNotFoundError as error:
        raise ApiError(404, str(error), "path") from None


def ui_main(
    runs: str | Path | None = None,
    model: str | None = None,
    adapters: list[str] | None = None,
    *,
    adapters_root: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    api_key: str | None = None,
    **serve_options: Any,
) -> None:
    """`lorakit ui`: the page over a runs folder and, with a model, chat and compare.

    With --adapters-root the page (and the API) may load adapters from that folder at run time,
    under `lorakit serve`'s rules. serve_options: the rest of `serve_main`'s options.
    """
    runs_root = None
    if runs is not None:
        runs_root = Path(runs).resolve()
        if not runs_root.is_dir():
            raise ConfigError(f"--runs {runs}: not a directory; give the folder runs write into")
    if runs_root is None and model is None:
        raise ConfigError("lorakit ui needs --runs DIR, --model BASE or both")
    serve_main(
        model,
        list(adapters or []),
        host=host,
        port=port,
        api_key=api_key,
        adapters_root=adapters_root,
        allow_runtime_loading=adapters_root is not None,
        extend=page_routes(runs_root),
        open_paths=OPEN_PATHS,
        banner=f"web page: http://{host}:{port}/ui/",
        **serve_options,
    )
