"""The live job dashboard, shipped as an MCP App (the ``io.modelcontextprotocol/ui`` extension).

Hosts that announce the extension render ``ui://backprop/dashboard.html`` (``ui/dashboard.html``)
in a sandboxed iframe next to the result of ``start_finetune``, ``run_slao_series``, ``job_status``
and ``export_gguf``. The host hands the app that result once; the app then follows the job by
calling ``job_view`` through the host, a tool visible to apps only (``_meta.ui.visibility =
["app"]``), and calls ``cancel_job`` / ``export_gguf`` the same way. The server never serves HTTP.

Hosts that do not announce the extension see exactly the tools and resources they saw before: the
SDK lists an extension's tools and resources to every client, so ``hide_from_plain_hosts`` (a
middleware) removes ``job_view``, the ``ui`` metadata and the ``ui://`` resource from their lists.

``job_view`` reads the same job views as ``job_status`` (``ServerState.status``, the job's
``JobTail``) and only reshapes them for drawing: the loss curves on the global step axis with a
series' run boundaries, the method's own figures (named as trl logs them, drawn without knowing
the method), the GPU sample of the last step, the series' forgetting matrix, the export's files
and verification, the error with its hint, and a cancelled job's end in words for a person.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.resources import files
from typing import Any

from mcp.server.apps import APP_MIME_TYPE, Apps, client_supports_apps
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from pydantic import BaseModel, Field

from backprop_mcp.figures import grouped, is_share, label_of
from backprop_mcp.job_events import JobTail
from backprop_mcp.job_views import ServerState, percent_done
from backprop_mcp.store import JobRecord
from backprop_mcp.supervisor import read_job_result
from backprop_mcp.tool_outputs import JobStatus
from backprop_mcp.tooling import hints

DASHBOARD_URI = "ui://backprop/dashboard.html"
VIEW_TOOL = "job_view"
POLL_S = 1.0  # how often the app asks for a running job's view
MAX_POINTS = 1200  # per curve: about two points per pixel of the chart; keeps each poll small

# The four tools live in server.py and are registered on the server after it is built, while
# `Apps.tool` only works for tools handed to the SDK before (at `MCPServer(extensions=[...])`);
# so they carry the same `_meta.ui` that `Apps.tool(resource_uri=...)` would stamp.
LINKED_TOOL_META: dict[str, Any] = {"ui": {"resourceUri": DASHBOARD_URI}}


def dashboard_html() -> str:
    return files("backprop_mcp").joinpath("ui/dashboard.html").read_text(encoding="utf-8")


# -- the view -------------------------------------------------------------------------------------


class RunStart(BaseModel):
    run: int
    x: float = Field(description="where the run's first step sits on the continuous step axis")


class LossCurve(BaseModel):
    train: list[tuple[float, float]] = Field(default_factory=list, description="(step, loss)")
    eval: list[tuple[float, float]] = Field(default_factory=list, description="(step, eval loss)")
    run_starts: list[RunStart] = Field(
        default_factory=list, description="a series' runs 2..N: where each begins on the step axis"
    )


class MetricCurve(BaseModel):
    """One of the method's own figures over the steps: training points and held-out points."""

    name: str = Field(
        description="as trl logs it: rewards/chosen, rewards/accuracies, reward, rewards/<function>/mean, "
        "kl, completions/mean_length, ..."
    )
    group: str = Field(
        description="the chart it belongs to: its name's part before '/' (GRPO: a reward function's mean "
        "in 'reward', its std in 'reward_std', completion lengths in 'completions', the share cut off in "
        "'clipped_ratio')"
    )
    label: str = Field(description="its name within the chart: chosen, total, <function>, mean_length, ...")
    share: bool = Field(description="a value between 0 and 1 (an accuracy, a fraction)")
    train: list[tuple[float, float]] = Field(default_factory=list, description="(step, value)")
    eval: list[tuple[float, float]] = Field(default_factory=list, description="(step, held-out value)")


class DeviceView(BaseModel):
    tokens_per_s: float | None = None
    gpu_peak_memory_gib: float | None = Field(None, description="torch's peak allocation")
    gpu_memory_used_mb: int | None = None
    gpu_memory_total_mb: int | None = None
    temperature_c: int | None = None
    utilization_pct: int | None = None
    power_w: float | None = None


class ForgettingView(BaseModel):
    """Row i, column j: held-out loss (and exact-match accuracy) on slice j after run i."""

    slices: list[str]
    loss: list[list[float | None]]
    accuracy: list[list[float | None]] = Field(default_factory=list)
    summary: dict[str, Any] = Field(default_factory=dict, description="BWT, forgetting, plasticity, ...")


class ExportFile(BaseModel):
    name: str
    path: str
    size: str | None = None


class Verification(BaseModel):
    quantization: str
    passed: bool
    message: str


class ExportView(BaseModel):
    files: list[ExportFile] = Field(default_factory=list)
    verification: list[Verification] = Field(default_factory=list)
    ollama_model: str | None = None


class ErrorView(BaseModel):
    message: str
    hint: str | None = None


class StoppedView(BaseModel):
    """A cancelled job's end, written for a person: where it stopped, what was kept, how to go on."""

    message: str = Field(description="e.g. 'Cancelled at step 4 of 40.'")
    detail: str | None = Field(None, description="what was kept, e.g. the checkpoint")
    resume_command: str | None = Field(None, description="the command that continues the job")


class JobView(BaseModel):
    job: JobStatus
    percent: float | None = Field(None, description="0..100 over the whole job")
    loss: LossCurve
    metrics: list[MetricCurve] = Field(
        default_factory=list,
        description="the method's own figures by chart, the reward chart first, else in the order they came",
    )
    device: DeviceView
    forgetting: ForgettingView | None = None
    export: ExportView | None = None
    error: ErrorView | None = None
    stopped: StoppedView | None = None
    can_export: bool = Field(description="a succeeded fine-tune or series: export_gguf accepts it")
    poll_after_s: float | None = Field(description="ask again after this long; null once the job ended")


def _thin(points: list[tuple[float, float]], limit: int = MAX_POINTS) -> list[tuple[float, float]]:
    """Every k-th point (always the last) once a curve has more points than the chart can show."""
    if len(points) <= limit:
        return points
    stride = -(-len(points) // limit)
    kept = points[::stride]
    return kept if kept[-1] == points[-1] else [*kept, points[-1]]


def _device(tail: JobTail) -> DeviceView:
    """The last training step's throughput and GPU sample (none on the CPU)."""
    progress = tail.progress
    if progress is None:
        return DeviceView()
    gpu = progress.gpu or {}
    return DeviceView(
        tokens_per_s=progress.tokens_per_s,
        gpu_peak_memory_gib=progress.gpu_memory_gib,
        gpu_memory_used_mb=gpu.get("memory_used_mb"),
        gpu_memory_total_mb=gpu.get("memory_total_mb"),
        temperature_c=gpu.get("temperature_c"),
        utilization_pct=gpu.get("utilization_pct"),
        power_w=gpu.get("power_w"),
    )


def _forgetting(tail: JobTail, metrics: dict[str, Any]) -> ForgettingView | None:
    """From the finished result when there is one, else from the runs finished so far."""
    if metrics.get("loss_matrix"):
        return ForgettingView(
            slices=[str(s) for s in metrics.get("slices") or []],
            loss=metrics["loss_matrix"],
            accuracy=metrics.get("accuracy_matrix") or [],
            summary={
                k: v
                for k, v in metrics.items()
                if (k.startswith("loss_") and k != "loss_matrix") or k in _ACCURACY_KEYS
            },
        )
    if not tail.runs_finished:
        return None
    rows = tail.runs_finished
    return ForgettingView(
        slices=[str(r.metrics.get("slice") or f"run {r.run}") for r in rows],
        loss=[list(r.loss_row) for r in rows],
        accuracy=[list(r.accuracy_row) for r in rows],
        summary=dict(rows[-1].series),
    )


_ACCURACY_KEYS = ("average_accuracy", "backward_transfer", "forgetting", "plasticity")


def _export(metrics: dict[str, Any], artifacts: dict[str, str]) -> ExportView | None:
    files_ = metrics.get("files") or {}
    parity = metrics.get("parity") or {}
    if not files_ and not parity:
        return None
    return ExportView(
        files=[
            ExportFile(name=str(name), path=str(f.get("path", "")), size=f.get("human"))
            for name, f in files_.items()
            if isinstance(f, dict)
        ],
        verification=[
            Verification(quantization=q, passed=bool(r.get("passed")), message=str(r.get("message", "")))
            for q, r in parity.items()
            if isinstance(r, dict)
        ],
        ollama_model=artifacts.get("ollama_model") or metrics.get("ollama_model"),
    )


def _metrics(tail: JobTail) -> list[MetricCurve]:
    names = list(tail.metrics) + [n for n in tail.eval_metrics if n not in tail.metrics]
    return [
        MetricCurve(
            name=name,
            group=group,
            label=label_of(name, len(members)),
            share=is_share(name),
            train=_thin(tail.metrics.get(name, [])),
            eval=_thin(tail.eval_metrics.get(name, [])),
        )
        for group, members in grouped(names)
        for name in members
    ]


def _stopped(record: JobRecord, tail: JobTail, status: JobStatus) -> StoppedView | None:
    """Where a cancelled job stopped, from its own events (not the engine's message to an agent)."""
    if record.state != "cancelled":
        return None
    forced = (status.error or "").startswith("cancelled by force")
    verb = "Stopped by force" if forced else "Cancelled"
    p = status.progress
    if record.kind == "export":  # its files so far stay listed in the view's export section
        return StoppedView(message=f"Export {verb.lower()}.", detail="The files made so far are kept.")
    if p is None or p.step is None:
        where = " before it started" if tail.started is None else " before its first step"
    else:
        where = f" at step {p.step}" + (f" of {p.total}" if p.total else "")
        if p.run and p.num_runs and p.num_runs > 1:
            where += f", in run {p.run} of {p.num_runs}"
    detail = None
    if tail.checkpoint is not None:
        c = tail.checkpoint
        run = f" of run {c.run}" if c.run and p is not None and (p.num_runs or 0) > 1 else ""
        detail = f"Its checkpoint at step {c.step}{run} is kept."
    resume = tail.finished.resume_command if tail.finished is not None else None
    return StoppedView(message=f"{verb}{where}.", detail=detail, resume_command=resume)


def _error(record: JobRecord, tail: JobTail, status: JobStatus) -> ErrorView | None:
    if status.error is None or record.state == "cancelled":  # a cancel is no error: see _stopped
        return None
    if tail.error is not None:
        hint = tail.error.hint
    else:  # e.g. the worker wrote result.json but no error event
        detail = (read_job_result(record) or {}).get("error")
        hint = detail.get("hint") if isinstance(detail, dict) else None
    message = status.error
    if hint and message.endswith(str(hint)):  # describe_error appends the hint; show it on its own
        message = message[: -len(str(hint))].rstrip()
    return ErrorView(message=message, hint=hint)


def job_view(state: ServerState, record: JobRecord) -> JobView:
    status = state.status(record)
    tail = state.supervisor.tail(record)
    series = record.kind == "slao_series"
    # tail.run_starts[k] is where run k+1 began on the global step axis; run 1 needs no line.
    starts = [RunStart(run=k + 1, x=x) for k, x in enumerate(tail.run_starts) if k > 0]
    return JobView(
        job=status,
        percent=percent_done(record, status.progress),
        loss=LossCurve(train=_thin(tail.loss), eval=_thin(tail.eval_loss), run_starts=starts),
        metrics=_metrics(tail),
        device=_device(tail),
        forgetting=_forgetting(tail, status.metrics) if series else None,
        export=_export(status.metrics, status.artifacts) if record.kind == "export" else None,
        error=_error(record, tail, status),
        stopped=_stopped(record, tail, status),
        can_export=record.trained,
        poll_after_s=None if record.is_terminal else POLL_S,
    )


# -- the extension --------------------------------------------------------------------------------


def dashboard_extension(get_state: Callable[[], ServerState], find_job: Callable[[str], JobRecord]) -> Apps:
    """The Apps extension: the dashboard resource and the app-only ``job_view`` tool."""
    apps = Apps()
    apps.add_html_resource(
        DASHBOARD_URI,
        dashboard_html(),
        name="dashboard",
        title="Training dashboard",
        description="A job's live progress, loss curves, the method's own figures (rewards, ...), GPU, "
        "forgetting matrix and export, with Cancel and Export.",
        prefers_border=True,
    )

    @apps.tool(
        resource_uri=DASHBOARD_URI,
        visibility=["app"],
        name=VIEW_TOOL,
        title="Dashboard view of a job",
        annotations=hints(read_only=True, destructive=False, idempotent=True, open_world=False),
    )
    def view(job_id: str) -> JobView:
        """Everything the dashboard draws for one job (used by the dashboard app, not the model)."""
        return job_view(get_state(), find_job(job_id))

    return apps


async def hide_from_plain_hosts(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
    """Middleware: a client that did not announce the Apps extension gets today's lists, unchanged."""
    result = await call_next(ctx)
    if ctx.method not in ("tools/list", "resources/list") or client_supports_apps(ctx):
        return result
    if isinstance(result, BaseModel):  # handlers may answer models; the runner sends this wire form
        result = result.model_dump(by_alias=True, mode="json", exclude_none=True)
    if not isinstance(result, dict):
        return result
    if ctx.method == "tools/list":
        return {**result, "tools": [t for t in map(_plain_tool, result.get("tools") or []) if t is not None]}
    kept = [r for r in result.get("resources") or [] if r.get("mimeType") != APP_MIME_TYPE]
    return {**result, "resources": kept}


def _plain_tool(tool: dict[str, Any]) -> dict[str, Any] | None:
    """A tool as a host without Apps saw it before: app-only tools dropped, ``_meta.ui`` removed."""
    meta = tool.get("_meta") or {}
    ui = meta.get("ui")
    if not isinstance(ui, dict):
        return tool
    if "model" not in ui.get("visibility", ["model"]):
        return None
    rest = {k: v for k, v in meta.items() if k != "ui"}
    plain = {k: v for k, v in tool.items() if k != "_meta"}
    return {**plain, "_meta": rest} if rest else plain
