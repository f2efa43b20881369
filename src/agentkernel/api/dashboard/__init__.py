"""The web dashboard at /ui (pages, a live terminal) and the Prometheus metrics at /metrics."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from starlette.responses import Response
from starlette.staticfiles import StaticFiles

from agentkernel import metrics
from agentkernel.api.dashboard import pages
from agentkernel.api.dashboard.session import PREFIX, SessionGuard, Sessions, owns
from agentkernel.service import observers

__all__ = ["install", "owns"]

metrics_router = APIRouter()


@metrics_router.get("/metrics", tags=["server"], response_class=Response)
def scrape() -> Response:
    """The server's metrics in the Prometheus text format (see docs/api.md)."""
    return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)


def install(app: FastAPI, api_key: str | None) -> None:
    """Add /metrics (behind the API's key) and the dashboard (behind its own session login)."""
    observers.sink = metrics  # from now on this process counts what the service reports
    app.state.dashboard_sessions = sessions = Sessions(api_key)
    app.include_router(metrics_router)
    app.include_router(pages.router)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=Path(__file__).parent / "static"), name="ui-static")
    app.add_middleware(SessionGuard, sessions=sessions)
