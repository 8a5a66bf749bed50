"""Screenshots of a pipeline run in MLflow's UI, taken with headless Chromium.

    .venv/bin/python scripts/mlflow_screenshots.py                         # the project's mlflow.db, latest pipeline run
    .venv/bin/python scripts/mlflow_screenshots.py --tracking-uri http://127.0.0.1:5000 --run-id RUN_ID

A ``sqlite:///`` store (default: the project's ``mlflow.db``) is served by a temporary ``mlflow server`` for
the shots; an ``http(s)`` URI is used as it is. It opens, on MLflow's model-training view
(``tasks.parent_run.ui_paths``), the pipeline parent run (datasets, registered model, tags), its charts and
its one-page report (and, with ``--pages experiment ...``, the experiment's runs), and writes ``run.png``,
``charts.png``, ``report.png`` (``experiment.png``) under ``--out`` (default ``docs/screenshots``), each
reduced to a small palette PNG.

Needs Chromium (``apt-get install -y chromium``; or ``--browser PATH``). The MLflow UI is a JavaScript app whose
charts load lazily: each page gets ``--wait`` seconds of real time before the shot.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PAGES = ("experiment", "run", "charts", "report")
README_PAGES = ("run", "charts", "report")
"""The pages shot by default: those the README shows."""
HEIGHTS = {"experiment": 700, "run": 1300, "charts": 1500, "report": 1500}
"""Viewport height of each shot (px)."""


def find_browser(given: str | None) -> str:
    for name in ([given] if given else ["chromium", "chromium-browser", "google-chrome", "chrome"]):
        found = shutil.which(name) if name else None
        if found:
            return found
    raise SystemExit("no Chromium found: install it (`apt-get install -y chromium`) or pass --browser PATH")


@contextmanager
def served(uri: str):
    """``uri`` itself for an http(s) server; for a ``sqlite:///`` store, a temporary ``mlflow server`` on it."""
    if uri.startswith(("http://", "https://")):
        yield uri.rstrip("/")
        return
    if not uri.startswith("sqlite:///"):
        raise SystemExit(f"--tracking-uri must be http(s):// or sqlite:///, got {uri!r}")
    with socket.socket() as sock:  # a free port on 127.0.0.1
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           "NO_PROXY": "127.0.0.1,localhost"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with tempfile.TemporaryDirectory(prefix="rlhf-shots-") as tmp:
        log = Path(tmp) / "server.log"
        with log.open("wb") as out:
            # No --artifacts-destination: each run's artifacts stay where its artifact URI says (the project's mlruns/).
            proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                                     "--workers", "1", "--backend-store-uri", uri], stdout=out, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 90
            while not _answers(f"{url}/health"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"mlflow server on {uri} did not start:\n{log.read_text(errors='replace')[-2000:]}")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def latest_parent_run(url: str, experiment: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(url)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"no experiment {experiment!r} at {url}")
    runs = client.search_runs([found.experiment_id], "tags.pipeline = 'rlhf' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise SystemExit(f"no finished pipeline run in experiment {experiment!r} at {url}")
    return runs[0].info.run_id


class Browser:
    """Headless Chromium driven over the DevTools protocol (``websockets``, a Prefect dependency): a page is shot
    after ``wait_s`` seconds of real time, since the UI's charts load lazily, which ``--screenshot`` does not wait for."""

    def __init__(self, path: str) -> None:
        self.profile = tempfile.TemporaryDirectory(prefix="rlhf-chromium-")
        self.process = subprocess.Popen(
            [path, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile.name}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for line in self.process.stderr:  # "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/..."
            if found := re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line):
                break
        else:
            raise SystemExit("chromium did not start its DevTools endpoint")
        with urllib.request.urlopen(f"http://127.0.0.1:{found.group(1)}/json/list", timeout=10) as response:
            page = next(t for t in json.load(response) if t["type"] == "page")
        from websockets.sync.client import connect

        self.socket = connect(page["webSocketDebuggerUrl"], max_size=None)
        self.calls = 0
        self.call("Page.enable")

    def call(self, method: str, **params):
        self.calls += 1
        self.socket.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self.calls:
                if "error" in message:
                    raise SystemExit(f"chromium: {method}: {message['error']}")
                return message.get("result", {})

    def shoot(self, url: str, out: Path, *, width: int, height: int, wait_s: float) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        self.call("Page.navigate", url=url)
        time.sleep(wait_s)
        # The assistant panel opens by default on a fresh browser; close it to give the page its width.
        self.call("Runtime.evaluate", expression="document.querySelector("
                  "'[data-component-id=\"mlflow.assistant.chat_panel.close\"]')?.click()")
        time.sleep(1.5)
        out.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        self.process.wait(timeout=10)
        self.profile.cleanup()


def shrink(path: Path, max_width: int, colours: int) -> None:
    """Scale to ``max_width`` and keep ``colours`` palette colours: a UI screenshot stays legible at a fraction of the size."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    if image.width > max_width:
        image = image.resize((max_width, round(image.height * max_width / image.width)), Image.LANCZOS)
    image.quantize(colors=colours, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def main(argv: list[str] | None = None) -> None:
    from tasks.parent_run import ui_paths

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / 'mlflow.db'}")
    parser.add_argument("--experiment", default="rlhf-pipeline", help="where to look for the latest pipeline run")
    parser.add_argument("--run-id", help="the pipeline parent run (default: the latest finished one)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--pages", nargs="+", choices=PAGES, default=list(README_PAGES))
    parser.add_argument("--browser")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--wait", type=float, default=10.0, help="seconds the UI gets to load and draw a page")
    parser.add_argument("--max-width", type=int, default=1100, help="scale the PNGs down to this width (0: keep)")
    parser.add_argument("--colours", type=int, default=64)
    args = parser.parse_args(argv)

    browser = Browser(find_browser(args.browser))
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        with served(args.tracking_uri) as url:
            from mlflow import MlflowClient

            run_id = args.run_id or latest_parent_run(url, args.experiment)
            paths = ui_paths(MlflowClient(url).get_run(run_id).info.experiment_id, run_id)
            for page in args.pages:
                target = args.out / f"{page}.png"
                browser.shoot(f"{url}/{paths[page]}", target, width=args.width, height=HEIGHTS[page], wait_s=args.wait)
                if args.max_width:
                    shrink(target, args.max_width, args.colours)
                print(f"{target}  ({target.stat().st_size // 1024} KB)  {url}/{paths[page]}", flush=True)
    finally:
        browser.close()


if __name__ == "__main__":
    main()
