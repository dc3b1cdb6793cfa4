"""The explorer in headless Debian chromium: one setup shared by tests/test_browser.py and
benchmarks/bench_app_browser.py (issue #21).

Starts ``python app.py`` in a subprocess on a free port (one torch thread, CPU, offline), launches
chromium through Playwright and stops the app again. No dirotq, torch or gradio import: the app runs in
its own process, so importing this module is cheap and keeps the import direction
app.py → analysis/ → dirotq/ (tests and benchmarks sit on top of all three). Playwright is imported by
the caller, which decides what a missing browser means (a test skips, the benchmark fails).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# headless in a container: no sandbox (root), no GPU, /dev/shm is small
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage")


def chromium_path() -> str:
    """``$DIROTQ_CHROMIUM``, else chromium on PATH, else Debian's /usr/bin/chromium (Playwright cannot
    download its own browsers offline)."""
    return os.environ.get("DIROTQ_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(model: str, cache_dir: str, log_path: Path, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """``python app.py --model MODEL`` on a free port with one torch thread on the CPU, its output in
    ``log_path``; returns (process, url) once it listens. Raises RuntimeError with the log's tail if it
    exits or does not listen within ``timeout`` seconds."""
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(ROOT / "app.py"), "--model", str(model), "--port", str(free_port()),
           "--cache-dir", str(cache_dir), "--threads", "1", "--device", "cpu"]
    with open(log_path, "w") as fh:  # the child keeps its own handle
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = re.search(r"running on (http://\S+)", Path(log_path).read_text())
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"app.py did not start:\n{Path(log_path).read_text()[-3000:]}")


def stop_app(proc: subprocess.Popen) -> None:
    """Terminate the app (Ctrl-C-like), kill it if it does not exit within 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def launch_chromium(playwright: Any, executable: str | None = None) -> Any:
    """A headless chromium Browser from a started ``sync_playwright()``."""
    return playwright.chromium.launch(executable_path=executable or chromium_path(), headless=True,
                                      args=list(CHROMIUM_ARGS))


def save_small_png(png: bytes, path: str | Path) -> Path:
    """Write a screenshot as a 256-colour PNG: a third of the RGB file's size for these UI shots, and no
    visible loss (median cut keeps the near-white panel borders an octree merges; no dithering noise)."""
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    img = img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    img.save(path, "PNG", optimize=True)
    return Path(path)


def plot_fits(page: Any, elem_id: str, tol_px: float = 1.0) -> bool:
    """Whether the Plotly figure in ``#elem_id`` is as wide as its container (within ``tol_px``): a plot
    drawn while its tab was hidden during a window resize can keep its old width. False when no plot."""
    gap = page.evaluate("""(id) => {
      const gd = document.querySelector('#' + id + ' .js-plotly-plot');
      const svg = gd && gd.querySelector('.main-svg');
      return svg ? Math.abs(gd.getBoundingClientRect().width - svg.getBoundingClientRect().width) : null;
    }""", elem_id)
    return gap is not None and gap <= tol_px
