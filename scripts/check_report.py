"""Open a medlatent HTML report in a real headless Chromium, take a screenshot, and check that
every image decoded and nothing was written to the browser console.

    python scripts/check_report.py runs/blood/report.html --screenshot docs/report.png

Exit status 0 when the page is sound, 1 otherwise (one line saying why). Uses Debian's
chromium (``apt-get install chromium``) with no Python browser driver: the page's own script
records ``<body data-images="loaded/total">``, read back with ``--dump-dom``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def check(page: Path, screenshot: Path | None = None, width: int = 1200, height: int = 3000,
          timeout: float = 120.0) -> tuple[bool, str]:
    """(ok, one-line summary)."""
    browser = find_chromium()
    if browser is None:
        return False, "no chromium found (apt-get install chromium)"
    url = page.resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
                              "--virtual-time-budget=5000", "--dump-dom", url],
                             capture_output=True, text=True, timeout=timeout)
    console = [ln for ln in dom.stderr.splitlines() if ":CONSOLE" in ln]
    found = re.search(r'<body[^>]*data-images="(\d+)/(\d+)"', dom.stdout)
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={screenshot.resolve()}",
                            f"--window-size={width},{height}", "--hide-scrollbars", url],
                           capture_output=True, timeout=timeout)
    if not found:
        return False, f"{page}: the page did not finish loading (no data-images mark)"
    loaded, total = int(found.group(1)), int(found.group(2))
    if loaded != total or total == 0:
        return False, f"{page}: {loaded} of {total} images loaded"
    if console:
        return False, f"{page}: {len(console)} console message(s), first: {console[0][-200:]}"
    if screenshot is not None and not screenshot.is_file():
        return False, f"{page}: no screenshot written"
    return True, f"{page}: {loaded}/{total} images loaded, no console messages"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("page", type=Path)
    ap.add_argument("--screenshot", type=Path, default=None)
    args = ap.parse_args()
    ok, line = check(args.page, args.screenshot)
    print(line)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
