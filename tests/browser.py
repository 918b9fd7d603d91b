"""Headless Chromium for the HTML reports' tests: the browser (installed with apt-get where the
tests run as root and it is missing), and a page run with a probe script whose JSON comes back."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path


def find_chromium() -> str | None:
    """Headless Chromium's path: on PATH, or installed with apt-get where the tests run as root."""
    path = shutil.which("chromium")
    if path is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(
            ["apt-get", "install", "-y", "chromium"],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=900,
        )
        path = shutil.which("chromium")
    return path


def probe(chromium: str, page: str, script: str, folder: Path) -> dict:
    """Load `page` with `script` (a <script> that appends <pre id="probe">JSON</pre>) at the end of
    its body in headless Chromium; the JSON the script wrote."""
    report = folder / "report.html"
    report.write_text(page.replace("</body>", script + "</body>"), encoding="utf-8")
    run = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            f"--user-data-dir={folder / 'profile'}",
            "--dump-dom",
            report.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(r'<pre id="probe">(.*?)</pre>', run.stdout)
    assert match, run.stderr[-2000:]
    return json.loads(html.unescape(match.group(1)))
