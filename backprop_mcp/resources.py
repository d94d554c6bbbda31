"""The server's resources under ``backprop://``, and ``resources/subscribe`` for 2025-11-25 clients.

2026-07-28 clients hear of changes through the subscription bus (``subscriptions/listen``); the
older protocol has no handler in MCPServer by default, so it is registered here on the low-level
server, as the SDK's migration guide documents (the SDK has no public API for it in 2.3).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp.types import EmptyResult, SubscribeRequestParams, UnsubscribeRequestParams

from backprop_mcp.job_views import GPU_URI, JOBS_URI, ServerState
from backprop_mcp.lossplot import render_loss_png
from backprop_mcp.store import JobRecord
from engine.interface import gpu_report

log = logging.getLogger("backprop_mcp")


class LegacySubscriptions:
    """``resources/subscribe`` (2025-11-25): which connections want which URIs."""

    def __init__(self) -> None:
        self._by_uri: dict[str, dict[int, Any]] = {}

    @staticmethod
    def _key(session: Any) -> int:
        # One entry per connection: each request gets its own session proxy over one connection.
        return id(getattr(session, "_connection", session))

    def add(self, uri: str, session: Any) -> None:
        self._by_uri.setdefault(uri, {})[self._key(session)] = session

    def remove(self, uri: str, session: Any) -> None:
        self._by_uri.get(uri, {}).pop(self._key(session), None)

    async def notify(self, uri: str) -> None:
        for key, session in list(self._by_uri.get(uri, {}).items()):
            try:
                await session.send_resource_updated(uri)
            except Exception as exc:  # a closed connection: forget it
                log.debug("dropping subscriber of %s: %s", uri, exc)
                self._by_uri.get(uri, {}).pop(key, None)


def register_resources(
    server: MCPServer,
    state: Callable[[], ServerState],
    find_job: Callable[[str], JobRecord],
    legacy: LegacySubscriptions,
) -> None:
    # -- resources --------------------------------------------------------------------------------

    def resource_job(job_id: str) -> JobRecord:
        try:
            return find_job(job_id)
        except ToolError as exc:
            raise ResourceNotFoundError(str(exc)) from exc

    @server.resource(JOBS_URI, name="jobs", title="All jobs", mime_type="application/json")
    def jobs_resource() -> str:
        """Every job in the state folder, newest first."""
        return state().job_list(limit=200).model_dump_json(indent=1)

    @server.resource(f"{JOBS_URI}/{{job_id}}", name="job", title="Job status", mime_type="application/json")
    def job_resource(job_id: str) -> str:
        """One job's status: state, progress, metrics, artifacts, error."""
        return state().status(resource_job(job_id)).model_dump_json(indent=1)

    @server.resource(
        f"{JOBS_URI}/{{job_id}}/events",
        name="job_events",
        title="Recent job events",
        mime_type="application/json",
    )
    def job_events_resource(job_id: str) -> str:
        """The job's most recent events (progress, stages, warnings, errors), oldest first."""
        events = state().recent_events(resource_job(job_id))
        return json.dumps({"job_id": job_id, "events": events}, default=str)

    @server.resource(
        f"{JOBS_URI}/{{job_id}}/loss.png", name="job_loss", title="Loss curve", mime_type="image/png"
    )
    def job_loss_resource(job_id: str) -> bytes:
        """The training loss (blue), held-out loss (orange) and a series' run starts against the step, as a PNG;
        a method that reports rewards (DPO, KTO, ORPO, GRPO) gets them in a second panel under the loss."""
        record = resource_job(job_id)
        tail = state().supervisor.tail(record)
        return render_loss_png(
            list(tail.loss), list(tail.eval_loss), list(tail.run_starts), dict(tail.metrics)
        )

    @server.resource(GPU_URI, name="gpu", title="GPU state", mime_type="application/json")
    def gpu_resource() -> str:
        """The GPUs' current memory, utilisation and temperature (same as inspect_gpu)."""
        return gpu_report().model_dump_json(indent=1)

    # -- resources/subscribe for 2025-11-25 clients (2026-07-28 uses subscriptions/listen) ------

    async def on_subscribe(ctx: Any, params: SubscribeRequestParams) -> EmptyResult:
        legacy.add(str(params.uri), ctx.session)
        return EmptyResult()

    async def on_unsubscribe(ctx: Any, params: UnsubscribeRequestParams) -> EmptyResult:
        legacy.remove(str(params.uri), ctx.session)
        return EmptyResult()

    server._lowlevel_server.add_request_handler("resources/subscribe", SubscribeRequestParams, on_subscribe)
    server._lowlevel_server.add_request_handler(
        "resources/unsubscribe", UnsubscribeRequestParams, on_unsubscribe
    )
