"""Headless Chromium (Debian's ``chromium``) driven over the DevTools protocol with aiohttp's
websocket client: open a local file, collect console errors and uncaught exceptions, evaluate
JavaScript in the page, take a screenshot.

Network safety: the browser is started with every background service off and a host resolver that
resolves nothing (``MAP * ~NOTFOUND``): it never asks the machine's resolver; the DevTools
endpoint listens on 127.0.0.1. Only ``file://`` pages are opened.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

BINARY = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = (
    "--headless=new",
    "--no-sandbox",  # root in a container
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-extensions",
    "--metrics-recording-only",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)
LISTENING = re.compile(r"DevTools listening on (ws://127\.0\.0\.1:\d+/devtools/browser/\S+)")


@dataclass
class PageReport:
    errors: list[str] = field(default_factory=list)  # console errors, uncaught exceptions, failed loads
    value: Any = None  # what the expression evaluated to
    screenshot_png: bytes = b""


class _Session:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = msg.json()
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            else:
                await self.events.put(data)

    async def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> Any:
        n = next(self.ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[n] = fut
        msg: dict[str, Any] = {"id": n, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        await self.ws.send_json(msg)
        answer = await asyncio.wait_for(fut, 30)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer.get("result", {})


@contextlib.asynccontextmanager
async def browser() -> AsyncIterator[str]:
    """Start Chromium; yield its DevTools websocket URL; stop it."""
    if BINARY is None:
        raise RuntimeError("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="edgeprobe-chromium-") as profile:
        proc = await asyncio.create_subprocess_exec(
            BINARY, *FLAGS, f"--user-data-dir={profile}", "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert proc.stderr is not None
            url = None
            async with asyncio.timeout(60):
                while url is None:
                    line = await proc.stderr.readline()
                    if not line:
                        raise RuntimeError("chromium exited before its DevTools endpoint was ready")
                    m = LISTENING.search(line.decode(errors="replace"))
                    url = m.group(1) if m else None
            drain = asyncio.create_task(proc.stderr.read())  # keep its pipe from filling
            yield url
            drain.cancel()
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


async def open_page(path: Path, expression: str, width: int = 1300) -> PageReport:
    """Load ``path`` in a fresh headless Chromium, wait for its load event, evaluate ``expression``
    (its JSON value), screenshot the whole page; every console error on the way is reported."""
    report = PageReport()
    async with browser() as ws_url, aiohttp.ClientSession() as http, http.ws_connect(ws_url, max_msg_size=0) as ws:
        s = _Session(ws)
        target = (await s.call("Target.createTarget", {"url": "about:blank"}))["targetId"]
        sid = (await s.call("Target.attachToTarget", {"targetId": target, "flatten": True}))["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            await s.call(f"{domain}.enable", session=sid)
        await s.call("Emulation.setDeviceMetricsOverride",
                     {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, sid)  # fmt: skip
        nav = await s.call("Page.navigate", {"url": path.resolve().as_uri()}, sid)
        if nav.get("errorText"):
            report.errors.append(f"navigation: {nav['errorText']}")
        async with asyncio.timeout(30):
            while True:
                ev = await s.events.get()
                _collect(ev, report)
                if ev.get("method") == "Page.loadEventFired":
                    break
        result = await s.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, sid)
        if "exceptionDetails" in result:
            report.errors.append(f"evaluate: {result['exceptionDetails'].get('text')}")
        report.value = result.get("result", {}).get("value")
        shot = await s.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, sid)
        report.screenshot_png = base64.b64decode(shot["data"])
        while not s.events.empty():  # anything reported while we evaluated
            _collect(s.events.get_nowait(), report)
        s.reader.cancel()
    return report


def _collect(ev: dict[str, Any], report: PageReport) -> None:
    method, params = ev.get("method"), ev.get("params", {})
    if method == "Runtime.exceptionThrown":
        d = params.get("exceptionDetails", {})
        report.errors.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
    elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
        report.errors.append(
            "console: " + " ".join(str(a.get("value", a.get("description"))) for a in params.get("args", []))
        )
    elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
        e = params["entry"]
        report.errors.append(f"log ({e.get('source')}): {e.get('text')}")
