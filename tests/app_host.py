"""The browser side of tests/test_app.py: a minimal MCP Apps host page in headless Chromium.

The host page embeds the dashboard the way Claude or VS Code do (a sandboxed iframe speaking
JSON-RPC over postMessage): it answers ui/initialize with a hostContext, hands the app one tool
result, and forwards the app's tools/call to the real server through an MCP client (refusing tools
whose ``_meta.ui.visibility`` lacks "app", as hosts do). Chromium is Debian's (``BACKPROP_CHROMIUM``
overrides the path), driven by Playwright; without either the tests skip and say why.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.extension import advertise
from mcp.server.apps import APP_MIME_TYPE, EXTENSION_ID

from backprop_mcp.app import DASHBOARD_URI

CHROMIUM = os.environ.get("BACKPROP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_S = 240.0  # generous: loading torch in the worker is slow on a busy 2-core machine


def apps_host() -> list[Any]:
    """What a host that renders MCP Apps announces."""
    return [advertise(EXTENSION_ID, {"mimeTypes": [APP_MIME_TYPE]})]


HOST_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>test host</title>
<style>body { margin: 0; background: %(page_bg)s; } iframe { border: 0; width: 100%%; height: 400px; display: block; }</style>
</head><body>
<iframe id="app" title="dashboard" sandbox="allow-scripts"></iframe>
<script>
// A minimal MCP Apps host: the app is a sandboxed iframe; we answer its JSON-RPC over postMessage.
const frame = document.getElementById("app");
window.appMessages = [];
window.toolCalls = [];
function post(message) { frame.contentWindow.postMessage({ jsonrpc: "2.0", ...message }, "*"); }
window.addEventListener("message", async (event) => {
  if (event.source !== frame.contentWindow) return;
  const m = event.data;
  window.appMessages.push(m);
  if (m.method === "ui/initialize") {
    post({ id: m.id, result: {
      protocolVersion: "2026-01-26",
      hostInfo: { name: "backprop-test-host", version: "1" },
      hostCapabilities: { serverTools: {} },
      hostContext: { theme: window.hostTheme, displayMode: "inline", toolInfo: { tool: { name: window.toolName } } },
    } });
  } else if (m.method === "ui/notifications/initialized") {
    post({ method: "ui/notifications/tool-input", params: { arguments: window.toolArguments } });
    post({ method: "ui/notifications/tool-result", params: window.toolResult });
  } else if (m.method === "tools/call") {
    window.toolCalls.push(m.params.name);
    const visibility = window.toolVisibility[m.params.name];
    if (!visibility || !visibility.includes("app")) {  // hosts refuse tools an app may not call
      post({ id: m.id, error: { code: -32602, message: "tool not available to apps: " + m.params.name } });
      return;
    }
    try { post({ id: m.id, result: await window.mcpCallTool(m.params.name, m.params.arguments || {}) }); }
    catch (err) { post({ id: m.id, error: { code: -32603, message: String(err) } }); }
  } else if (m.method === "ui/notifications/size-changed") {
    frame.style.height = m.params.height + "px";
  } else if (m.id !== undefined) {
    post({ id: m.id, error: { code: -32601, message: "unsupported: " + m.method } });
  }
});
</script></body></html>
"""


def browser_or_skip() -> Any:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; it uses Debian's chromium)")
    if not (shutil.which(CHROMIUM) or Path(CHROMIUM).exists()):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set BACKPROP_CHROMIUM)")
    return async_playwright


def wire(result: Any) -> dict[str, Any]:
    return result.model_dump(by_alias=True, mode="json", exclude_none=True)


class Dashboard:
    """One browser page hosting the dashboard for one tool result."""

    def __init__(self, page: Any, client: Client):
        self.page, self.client = page, client

    @classmethod
    async def open(
        cls,
        browser: Any,
        client: Client,
        tool: str,
        arguments: dict[str, Any],
        result: Any,
        theme: str | None,
        system_theme: str = "light",
    ) -> Dashboard:
        """``theme``: what the host's hostContext says (None: it says nothing); ``system_theme``: the
        page's prefers-color-scheme."""
        page = await browser.new_page(viewport={"width": 900, "height": 800}, color_scheme=system_theme)
        self = cls(page, client)
        tools = (await client.list_tools()).tools
        visibility = {
            t.name: ((t.meta or {}).get("ui") or {}).get("visibility", ["model", "app"]) for t in tools
        }
        html = (await client.read_resource(DASHBOARD_URI)).contents[0].text

        async def call_tool(name: str, args: dict[str, Any]) -> dict[str, Any]:
            return wire(await client.call_tool(name, args))

        await page.expose_function("mcpCallTool", call_tool)
        dark = (theme or system_theme) == "dark"
        await page.set_content(HOST_PAGE % {"page_bg": "#0d1117" if dark else "#ffffff"})
        await page.evaluate(
            """([html, tool, args, result, theme, visibility]) => {
                 Object.assign(window, { toolName: tool, toolArguments: args, toolResult: result,
                                         hostTheme: theme, toolVisibility: visibility });
                 document.getElementById("app").srcdoc = html;
               }""",
            [html, tool, arguments, wire(result), theme, visibility],
        )
        return self

    async def frame(self) -> Any:
        handle = await self.page.wait_for_selector("#app")
        frame = await handle.content_frame()
        await frame.wait_for_selector("#state")
        return frame

    async def until(self, what: str, check: Callable[[], Awaitable[bool]]) -> None:
        """Wait until ``check`` holds, reading the DOM from here: the app's CSP forbids the eval that
        Playwright's ``wait_for_function`` needs, and the test keeps the app under its real CSP."""
        deadline = anyio.current_time() + WAIT_S
        while not await check():
            if anyio.current_time() > deadline:
                raise AssertionError(f"the dashboard never showed {what}")
            await anyio.sleep(0.2)

    async def number(self, selector: str, attribute: str) -> float:
        value = await self.attr(selector, attribute)
        return float(value) if value else 0.0

    async def text(self, selector: str) -> str:
        return await (await self.frame()).inner_text(selector)

    async def attr(self, selector: str, name: str) -> str:
        return await (await self.frame()).get_attribute(selector, name) or ""

    async def screenshot(self, *paths: Path, min_bytes: int = 0) -> None:
        """Screenshots of the app's frame. With ``min_bytes``, retake (for up to ~5 s) while the image
        is smaller: on a loaded machine the frame can be captured before it has painted (a blank PNG)."""
        await self.page.wait_for_timeout(300)  # let the progress bar's width transition settle
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            for _ in range(10):
                await self.page.locator("#app").screenshot(path=str(path))
                if path.stat().st_size >= min_bytes:
                    break
                await self.page.wait_for_timeout(500)


async def at_least(value: Awaitable[float], bound: float) -> bool:
    return await value >= bound


async def equals(value: Awaitable[str], expected: str) -> bool:
    return await value == expected


async def contains(value: Awaitable[str], part: str) -> bool:
    return part in await value


# -- a second host, written from the MCP Apps spec (SEP-1865, 2026-01-26) rather than from our app ----
#
# A web host: the view runs in an inner iframe of a sandbox proxy on another origin (spec "Sandbox
# proxy"), which forwards every message but its own ui/notifications/sandbox-*; the host answers
# ui/initialize with a hostContext carrying theme, style variables and containerDimensions (a fixed
# width, a flexible height up to maxHeight), sends nothing before ui/notifications/initialized, and
# sizes the frame from ui/notifications/size-changed for each flexible dimension ("Host Behavior"
# under Container Dimensions). Both origins are served by Playwright (page.route): nothing leaves the
# machine. The frame starts taller than any dashboard, so only a view that reports its content's own
# height ends with a frame that fits it.

SPEC_HOST_ORIGIN = "https://host.test"
SPEC_SANDBOX_ORIGIN = "https://sandbox.test"
SPEC_HOST_START_HEIGHT = 1600  # px: the frame's height before the view reports its own

SPEC_HOST_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>spec host</title>
<style>
  body { margin: 0; padding: 16px; background: %(page_bg)s; font: 14px sans-serif; color: %(text)s; }
  #sandbox { border: 0; display: block; width: 100%%; height: %(start_height)dpx; }
</style></head><body>
<p>The user asked for a training job.</p>
<iframe id="sandbox" title="app" sandbox="allow-scripts allow-same-origin"
        src="%(sandbox_origin)s/proxy.html"></iframe>
<p id="after">The conversation goes on below the app.</p>
<script>
Object.assign(window, %(data)s);  // what the host knows: the resource, the tool call, its context
const SANDBOX_ORIGIN = "%(sandbox_origin)s";
const sandbox = document.getElementById("sandbox");
window.appMessages = [];
window.toolCalls = [];
window.sizeReports = [];
let initialized = false;
function toView(message) { sandbox.contentWindow.postMessage({ jsonrpc: "2.0", ...message }, SANDBOX_ORIGIN); }
window.addEventListener("message", async (event) => {
  if (event.source !== sandbox.contentWindow || event.origin !== SANDBOX_ORIGIN) return;
  const m = event.data;
  if (!m || m.jsonrpc !== "2.0") return;
  if (m.method === "ui/notifications/sandbox-proxy-ready") {
    toView({ method: "ui/notifications/sandbox-resource-ready", params: { html: window.appHtml } });
    return;
  }
  window.appMessages.push(m);
  const context = window.hostContext;
  if (m.method === "ui/initialize") {
    toView({ id: m.id, result: {
      protocolVersion: "2026-01-26",
      hostInfo: { name: "spec-host", version: "1" },
      hostCapabilities: { serverTools: {}, logging: {} },
      hostContext: context,
    } });
  } else if (m.method === "ui/notifications/initialized") {
    initialized = true;
    toView({ method: "ui/notifications/tool-input", params: { arguments: window.toolArguments } });
    toView({ method: "ui/notifications/tool-result", params: window.toolResult });
  } else if (m.method === "ui/notifications/size-changed") {
    window.sizeReports.push(m.params);
    const dims = context.containerDimensions || {};
    if (!("width" in dims) && m.params.width != null) {
      sandbox.style.width = Math.min(m.params.width, dims.maxWidth || Infinity) + "px";
    }
    if (!("height" in dims) && m.params.height != null) {
      sandbox.style.height = Math.min(m.params.height, dims.maxHeight || Infinity) + "px";
    }
  } else if (m.method === "tools/call") {
    window.toolCalls.push(m.params.name);
    const visibility = window.toolVisibility[m.params.name];
    if (!initialized || !visibility || !visibility.includes("app")) {
      toView({ id: m.id, error: { code: -32602, message: "tool not available to apps: " + m.params.name } });
      return;
    }
    try { toView({ id: m.id, result: await window.mcpCallTool(m.params.name, m.params.arguments || {}) }); }
    catch (err) { toView({ id: m.id, error: { code: -32603, message: String(err) } }); }
  } else if (m.method === "ping") {
    toView({ id: m.id, result: {} });
  } else if (m.id !== undefined) {
    toView({ id: m.id, error: { code: -32601, message: "unsupported: " + m.method } });
  }
});
</script></body></html>
"""

# The spec's restrictive default CSP ("Host Behavior" under UI Resource Format), for a resource
# that declares no ui.csp, plus the sandbox proxy's own rules (no nested frames, no plugins).
SPEC_DEFAULT_CSP = (
    "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; media-src 'self' data:; connect-src 'none'; frame-src 'none'; "
    "base-uri 'self'; object-src 'none'"
)

SPEC_PROXY_PAGE = """<!doctype html>
<html><head><meta charset="utf-8">
<style>html, body { margin: 0; height: 100%%; } iframe { border: 0; display: block; width: 100%%; height: 100%%; }</style>
</head><body>
<script>
const CSP = "%(csp)s";
let inner = null;
window.addEventListener("message", (event) => {
  const m = event.data;
  if (!m || m.jsonrpc !== "2.0") return;
  if (event.source === window.parent) {
    if (m.method === "ui/notifications/sandbox-resource-ready") {
      inner = document.createElement("iframe");
      inner.name = "view";
      inner.setAttribute("sandbox", m.params.sandbox || "allow-scripts");
      const meta = '<meta http-equiv="Content-Security-Policy" content="' + CSP + '">';
      const html = m.params.html;
      inner.srcdoc = /<head[^>]*>/i.test(html) ? html.replace(/<head[^>]*>/i, (h) => h + meta) : meta + html;
      document.body.appendChild(inner);
    } else if (inner && !String(m.method || "").startsWith("ui/notifications/sandbox-")) {
      inner.contentWindow.postMessage(m, "*");
    }
  } else if (inner && event.source === inner.contentWindow) {
    if (!String(m.method || "").startsWith("ui/notifications/sandbox-")) window.parent.postMessage(m, "*");
  }
});
window.parent.postMessage({ jsonrpc: "2.0", method: "ui/notifications/sandbox-proxy-ready", params: {} }, "*");
</script></body></html>
"""

# What a dark host with its own palette sends (its panel is #262624: the colour of issue 24's report).
DARK_HOST_STYLES = {
    "--color-background-primary": "#1f1e1d",
    "--color-background-secondary": "#262624",
    "--color-text-primary": "#f5f4ef",
    "--color-text-secondary": "#b7b5a9",
    "--color-border-primary": "#3e3e38",
}
LIGHT_HOST_STYLES = {
    "--color-background-primary": "#ffffff",
    "--color-background-secondary": "#f5f4ef",
    "--color-text-primary": "#141413",
    "--color-text-secondary": "#5e5d59",
    "--color-border-primary": "#dedcd1",
}


class SpecHostDashboard(Dashboard):
    """The dashboard in SPEC_HOST_PAGE: the view is the frame named "view" inside the sandbox proxy."""

    @classmethod
    async def open_in_spec_host(
        cls, browser: Any, client: Client, tool: str, arguments: dict[str, Any], result: Any, theme: str
    ) -> SpecHostDashboard:
        page = await browser.new_page(viewport={"width": 900, "height": 900}, color_scheme=theme)
        self = cls(page, client)
        tools = (await client.list_tools()).tools
        listed = {t.name: t for t in tools}
        visibility = {
            t.name: ((t.meta or {}).get("ui") or {}).get("visibility", ["model", "app"]) for t in tools
        }
        html = (await client.read_resource(DASHBOARD_URI)).contents[0].text
        styles = DARK_HOST_STYLES if theme == "dark" else LIGHT_HOST_STYLES
        context = {
            "toolInfo": {"tool": wire(listed[tool])},
            "theme": theme,
            "styles": {"variables": styles},
            "displayMode": "inline",
            "availableDisplayModes": ["inline"],
            "containerDimensions": {"width": 868, "maxHeight": 4000},
            "locale": "en-US",
            "platform": "web",
        }
        data = {
            "appHtml": html,
            "toolArguments": arguments,
            "toolResult": wire(result),
            "toolVisibility": visibility,
            "hostContext": context,
        }
        host_page = SPEC_HOST_PAGE % {
            "data": json.dumps(data).replace("<", "\\u003c"),  # no "</script>" or "<!--" in the script
            "page_bg": styles["--color-background-primary"],
            "text": styles["--color-text-primary"],
            "sandbox_origin": SPEC_SANDBOX_ORIGIN,
            "start_height": SPEC_HOST_START_HEIGHT,
        }
        proxy_page = SPEC_PROXY_PAGE % {"csp": SPEC_DEFAULT_CSP}

        async def serve(route: Any) -> None:
            body = proxy_page if route.request.url.startswith(SPEC_SANDBOX_ORIGIN) else host_page
            await route.fulfill(status=200, content_type="text/html; charset=utf-8", body=body)

        async def call_tool(name: str, args: dict[str, Any]) -> dict[str, Any]:
            return wire(await client.call_tool(name, args))

        await page.route(f"{SPEC_HOST_ORIGIN}/**", serve)
        await page.route(f"{SPEC_SANDBOX_ORIGIN}/**", serve)
        await page.expose_function("mcpCallTool", call_tool)
        await page.goto(f"{SPEC_HOST_ORIGIN}/chat")
        return self

    async def frame(self) -> Any:
        deadline = anyio.current_time() + WAIT_S
        while (view := self.page.frame(name="view")) is None:
            if anyio.current_time() > deadline:
                raise AssertionError("the sandbox proxy never made the view's frame")
            await anyio.sleep(0.1)
        await view.wait_for_selector("#state")
        return view

    async def screenshot(self, *paths: Path, min_bytes: int = 0) -> None:
        await self.page.wait_for_timeout(300)
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            await self.page.screenshot(path=str(path), full_page=True)
