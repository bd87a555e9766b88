"""A real browser for the ops page test: Debian's headless Chromium, driven over the DevTools protocol.

The protocol travels over ``--remote-debugging-pipe`` (JSON messages ending in NUL on fds 3 and 4: no port, no
websocket library). Each :class:`Tab` is a page in a browser context of its own (no shared cookies or cached
credentials), which answers the browser's HTTP authentication prompt the way a person would (``Fetch.authRequired``:
the user name and key typed in, or cancelled), and records what a person would see in the console: errors logged by
the page, uncaught exceptions, failed loads and CSP violations.
"""
from __future__ import annotations

import base64
import json
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def executable() -> str | None:
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


@dataclass
class Tab:
    browser: Browser
    session: str
    credentials: tuple[str, str] | None        # what is typed into the login prompt; None: cancel it
    console: list[str] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)   # URL -> HTTP status of its last response
    challenges: int = 0
    loaded: threading.Event = field(default_factory=threading.Event)

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        return self.browser.send(method, params, self.session)

    def open(self, url: str, timeout: float = 20.0) -> None:
        self.loaded.clear()
        self.send("Page.navigate", url=url)
        if not self.loaded.wait(timeout):
            raise AssertionError(f"{url} did not finish loading within {timeout:g} s")

    def evaluate(self, expression: str) -> Any:
        answer = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in answer:
            raise AssertionError(f"{expression!r} raised: {answer['exceptionDetails'].get('text')}")
        return answer["result"].get("value")

    def column(self, table: str, index: int, rows: str = "tbody tr") -> list[str]:
        """The text of one column of a table's rows (``rows``: a selector under the table)."""
        cells = f"[...document.querySelectorAll('#{table} {rows}')].map(r => r.cells[{index}].textContent)"
        return self.evaluate(cells)

    def wait_for(self, expression: str, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(0.25)

    def screenshot(self, path: Path) -> None:
        height = self.evaluate("Math.ceil(document.documentElement.scrollHeight)")
        self.send("Emulation.setDeviceMetricsOverride", width=1280, height=int(height), deviceScaleFactor=1,
                  mobile=False)
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    # ------------------------------------------------------------------ events (on the reader thread)
    def on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Fetch.requestPaused":
            self.browser.post("Fetch.continueRequest", {"requestId": params["requestId"]}, self.session)
        elif method == "Fetch.authRequired":
            self.challenges += 1
            answer = {"response": "CancelAuth"}
            if self.credentials is not None and self.challenges == 1:   # a person gives up after a refusal
                user, password = self.credentials
                answer = {"response": "ProvideCredentials", "username": user, "password": password}
            self.browser.post("Fetch.continueWithAuth", {"requestId": params["requestId"],
                                                         "authChallengeResponse": answer}, self.session)
        elif method == "Page.loadEventFired":
            self.loaded.set()
        elif method == "Network.responseReceived":
            self.statuses[params["response"]["url"]] = params["response"]["status"]
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            words = (str(arg.get("value", arg.get("description"))) for arg in params["args"])
            self.console.append("console: " + " ".join(words))
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.console.append("exception: " + str(details.get("exception", {}).get("description", details["text"])))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.console.append(f"log ({params['entry']['source']}): {params['entry']['text']}")


class Browser:
    """One headless Chromium process; ``tab()`` opens an isolated page; ``close()`` ends the process."""

    def __init__(self, path: str):
        self._profile = tempfile.mkdtemp(prefix="ops-chromium-")
        args = ["--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--mute-audio",
                f"--user-data-dir={self._profile}", "--window-size=1280,900", "about:blank"]
        # fd 3: what the browser reads (our stdin pipe), fd 4: what it writes (our stdout pipe)
        self._proc = subprocess.Popen(["sh", "-c", 'exec "$0" "$@" 3<&0 4>&1 </dev/null >/dev/null', path, *args],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._lock = threading.Lock()
        self._next = 0
        self._waiting: dict[int, queue.Queue] = {}
        self._tabs: dict[str, Tab] = {}
        self._reader = threading.Thread(target=self._read, name="cdp-reader", daemon=True)
        self._reader.start()

    def post(self, method: str, params: dict[str, Any], session: str | None = None) -> int:
        with self._lock:
            self._next += 1
            ident = self._next
            self._waiting[ident] = queue.Queue(1)
            message = {"id": ident, "method": method, "params": params, **({"sessionId": session} if session else {})}
            self._proc.stdin.write(json.dumps(message).encode() + b"\0")
            self._proc.stdin.flush()
        return ident

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        ident = self.post(method, params or {}, session)
        try:
            answer = self._waiting[ident].get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the browser did not answer {method} within {timeout:g} s") from None
        finally:
            self._waiting.pop(ident, None)
        if "error" in answer:
            raise AssertionError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    def tab(self, credentials: tuple[str, str] | None) -> Tab:
        context = self.send("Target.createBrowserContext", {"disposeOnDetach": True})["browserContextId"]
        target = self.send("Target.createTarget", {"url": "about:blank", "browserContextId": context})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        tab = self._tabs[session] = Tab(self, session, credentials)
        for method, params in (("Page.enable", {}), ("Runtime.enable", {}), ("Log.enable", {}),
                               ("Network.enable", {}),
                               ("Fetch.enable", {"handleAuthRequests": True, "patterns": [{"urlPattern": "*"}]})):
            tab.send(method, **params)
        return tab

    def _read(self) -> None:
        buffer = b""
        while chunk := self._proc.stdout.read1(65536):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message:
                    waiting = self._waiting.get(message["id"])
                    if waiting is not None:
                        waiting.put(message)
                elif message.get("sessionId") in self._tabs:
                    self._tabs[message["sessionId"]].on_event(message["method"], message.get("params", {}))

    def close(self) -> None:
        try:
            self.post("Browser.close", {})
            self._proc.wait(10)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            self._proc.kill()
            self._proc.wait(10)
        shutil.rmtree(self._profile, ignore_errors=True)
