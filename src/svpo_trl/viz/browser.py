"""Headless Chromium for checking and screenshotting the tree pages (no driver package needed).

Debian's ``chromium`` is driven with ``--dump-dom`` (the DOM after the page's JS ran, within a
virtual time budget) and ``--screenshot``. Background networking is switched off: without it,
Chromium's own connections hang on machines without internet.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "chromium", "chromium-browser")

_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def find_chromium() -> str | None:
    """Path of a Chromium executable, or None."""
    for candidate in CHROMIUM_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def _run(args: list[str], html_path: str | Path, fragment: str, timeout: float, chromium: str | None) -> str:
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("chromium not found (on Debian: apt-get install chromium)")
    url = Path(html_path).resolve().as_uri() + (f"#{fragment.lstrip('#')}" if fragment else "")
    with tempfile.TemporaryDirectory(prefix="svpo-chromium-") as profile:
        result = subprocess.run(
            [chromium, *_FLAGS, f"--user-data-dir={profile}", *args, url],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    if result.returncode != 0:
        raise RuntimeError(f"chromium exited with {result.returncode}: {result.stderr[-2000:]}")
    return result.stdout


def dump_dom(
    html_path: str | Path,
    fragment: str = "",
    *,
    width: int = 1500,
    height: int = 900,
    budget_ms: int = 3000,
    timeout: float = 60,
    chromium: str | None = None,
) -> str:
    """The page's DOM (serialized HTML) after its scripts ran in a ``width`` x ``height`` window;
    ``fragment`` is the URL hash, e.g. ``node=5``."""
    args = [f"--virtual-time-budget={budget_ms}", f"--window-size={width},{height}", "--dump-dom"]
    return _run(args, html_path, fragment, timeout, chromium)


def screenshot(
    html_path: str | Path,
    png_path: str | Path,
    fragment: str = "",
    *,
    width: int = 1500,
    height: int = 900,
    budget_ms: int = 3000,
    timeout: float = 60,
    chromium: str | None = None,
) -> Path:
    """Save a PNG of the page as a ``width`` x ``height`` window shows it."""
    png_path = Path(png_path).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    _run(
        [f"--virtual-time-budget={budget_ms}", f"--screenshot={png_path}", f"--window-size={width},{height}"],
        html_path,
        fragment,
        timeout,
        chromium,
    )
    if not png_path.is_file():
        raise RuntimeError(f"chromium did not write {png_path}")
    return png_path
