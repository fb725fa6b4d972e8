"""Headless Chromium for the documentation's screenshots (Debian package ``chromium``), driven over the
DevTools protocol: :func:`chromium` opens a tab of a given size, :class:`Page` navigates, runs
JavaScript and captures, :func:`wait_for` polls until a page (or a server) is ready."""

from __future__ import annotations

import base64
import json
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from websockets.sync.client import connect


class Page:
    """One Chromium tab over the DevTools protocol."""

    def __init__(self, ws_url: str):
        self.ws, self.n = connect(ws_url, max_size=2 ** 28), 0

    def call(self, method: str, **params) -> dict:
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:  # events arrive in between; the answer carries our id
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def open(self, url: str, what: str) -> None:
        """Navigate to ``url`` and wait until its document has loaded."""
        self.call("Page.navigate", url=url)
        wait_for(what, lambda: self.js("document.readyState === 'complete' || null"))

    def capture(self, out: Path) -> None:
        out.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))


def wait_for(what: str, ready: Callable[[], object], timeout: float = 60.0):
    """Poll ``ready`` until it returns something other than None; exit with one line after ``timeout`` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (value := ready()) is not None:
            return value
        time.sleep(0.5)
    raise SystemExit(f"error: {what} did not come up within {timeout:.0f} s")


def answers(url: str) -> bool | None:
    """True once ``url`` answers an HTTP GET, else None (for :func:`wait_for`)."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return None


@contextmanager
def chromium(size: tuple[int, int]) -> Iterator[Page]:
    """A headless Chromium with a fresh profile, its one tab ``size`` = (width, height) pixels."""
    # Chromium's helper processes may still write to the profile as it exits: its removal is best effort.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        profile = Path(tmp) / "chromium"
        browser = subprocess.Popen(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
             "--remote-debugging-port=0", "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port_file = profile / "DevToolsActivePort"
            devtools = wait_for("chromium", lambda: port_file.read_text().split()[0] if port_file.is_file() else None)
            targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{devtools}/json"))
            page = Page(next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page"))
            page.call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1,
                      mobile=False)
            yield page
        finally:
            browser.terminate()
            browser.wait()
