"""A real Prometheus server on loopback, scraping one endpoint, and its HTTP query API.

The load test starts Debian's `prometheus` (unpacked into the venv by scripts/install_tools.sh, or
any `prometheus` on PATH), points it at the vLLM server under test with a short scrape interval, and
reads every chart's series back through `/api/v1/query_range`: the report shows what an operator's
Prometheus would have recorded, not numbers we computed ourselves.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any


def find_prometheus() -> str:
    """The prometheus binary: next to this Python (the venv), else on PATH."""
    local = Path(sys.executable).with_name("prometheus")
    if local.exists():
        return str(local)
    found = shutil.which("prometheus")
    if found is None:
        raise RuntimeError("no `prometheus` binary: run `make setup` (scripts/install_tools.sh unpacks Debian's "
                           "prometheus into the venv) or install the Debian package prometheus")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape_config(target: str, interval_s: float) -> str:
    """prometheus.yml scraping `target` (host:port) at `interval_s`; job `vllm` as in deploy/prometheus."""
    interval = f"{int(interval_s * 1000)}ms"
    return (f"global:\n  scrape_interval: {interval}\n  evaluation_interval: {interval}\n"
            f"scrape_configs:\n  - job_name: vllm\n    metrics_path: /metrics\n"
            f"    scrape_interval: {interval}\n    scrape_timeout: {interval}\n"
            f"    static_configs:\n      - targets: ['{target}']\n")


class Prometheus:
    """`with Prometheus(target) as prom:` a prometheus process scraping `target`; removed on exit."""

    def __init__(self, target: str, interval_s: float = 1.0, binary: str | None = None) -> None:
        self.target, self.interval_s = target, interval_s
        self.binary = binary or find_prometheus()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._dir: tempfile.TemporaryDirectory | None = None
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> Prometheus:
        self._dir = tempfile.TemporaryDirectory(prefix="kvevict-prom-")
        root = Path(self._dir.name)
        (root / "prometheus.yml").write_text(scrape_config(self.target, self.interval_s))
        self.log = root / "prometheus.log"
        with open(self.log, "w") as sink:
            self._proc = subprocess.Popen(
                [self.binary, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=sink, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def _wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self._proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"prometheus did not become ready in {timeout_s:.0f} s")

    # ---- the HTTP API ---------------------------------------------------------------------------
    def _get(self, path: str, params: dict[str, Any]) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as err:
            body = json.loads(err.read() or b"{}")
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus query {params.get('query')!r} failed: {body.get('error', body)}")
        return body["data"]

    def targets_up(self) -> bool:
        """Whether the scrape target's last scrape succeeded."""
        data = self._get("/api/v1/targets", {"state": "active"})
        return any(t.get("health") == "up" for t in data.get("activeTargets", []))

    def wait_scraped(self, timeout_s: float = 30) -> None:
        """Block until the target has been scraped successfully at least once."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.targets_up():
                return
            time.sleep(self.interval_s / 2)
        raise RuntimeError(f"prometheus could not scrape {self.target} within {timeout_s:.0f} s ({self.url}/targets)")

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self._get("/api/v1/query", params)["result"]

    def query_range(self, expr: str, start: float, end: float, step_s: float) -> list[dict]:
        """[{labels, points: [(t, value)]}] with NaN/Inf points (e.g. a quantile of no traffic) dropped."""
        data = self._get("/api/v1/query_range", {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                                 "step": f"{step_s:g}"})
        out = []
        for series in data["result"]:
            points = [(float(t), float(v)) for t, v in series["values"] if math.isfinite(float(v))]
            out.append({"labels": series["metric"], "points": points})
        return out
