"""A real TensorBoard server on loopback, and its HTTP API read back.

    tb = TensorBoardServer(logdir, port, log, env).start()
    tb.runs()                                   # ["run_a", ...]
    tb.tags()                                   # {"run_a": {"train/loss": {...}}}
    tb.scalars("run_a", "train/loss")          # [(wall_time, step, value), ...]
    tb.stop()

TensorBoard rescans the log folder every ``reload_interval_s``; a run appears
about a second after its first event is written: :meth:`wait_for_scalars`.
"""
from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Dict, List, Tuple

from tests.cluster.daemons import Daemon, HarnessError, wait_until


class TensorBoardServer:
    def __init__(self, logdir: str, port: int, log: str, env: dict, reload_interval_s: int = 1):
        self.url = f"http://127.0.0.1:{port}"
        self._argv = [os.path.join(os.path.dirname(sys.executable), "tensorboard"), "--logdir", logdir,
                      "--host", "127.0.0.1", "--port", str(port), "--reload_interval", str(reload_interval_s)]
        self._log, self._env = log, env
        self.daemon = None

    def start(self, timeout_s: float = 60.0) -> "TensorBoardServer":
        self.daemon = Daemon("tensorboard", self._argv, self._log, self._env)
        try:
            wait_until(lambda: self.daemon.check_alive() or self._answers(), timeout_s,
                       f"TensorBoard at {self.url}", log=self._log)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()

    def _answers(self) -> bool:
        try:
            self.get("/data/runs")
            return True
        except (urllib.error.URLError, ConnectionError):
            return False

    def get(self, path: str, **query: str):
        """GET a JSON endpoint, e.g. ``get("/data/plugin/scalars/scalars", run=R, tag=T)``."""
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)

    def runs(self) -> List[str]:
        return self.get("/data/runs")

    def tags(self) -> Dict[str, Dict[str, dict]]:
        """run -> tag -> description, for the scalars plugin."""
        return self.get("/data/plugin/scalars/tags")

    def scalars(self, run: str, tag: str) -> List[Tuple[float, int, float]]:
        """[(wall_time, step, value), ...] of one scalar series."""
        try:
            return [tuple(p) for p in self.get("/data/plugin/scalars/scalars", run=run, tag=tag)]
        except urllib.error.HTTPError as e:
            if e.code in (400, 404):  # run or tag not loaded yet
                return []
            raise

    def wait_for_scalars(self, run: str, tag: str, count: int, timeout_s: float = 30.0):
        """The series once it holds at least ``count`` points."""
        def enough():
            points = self.scalars(run, tag)
            return points if len(points) >= count else None
        try:
            return wait_until(enough, timeout_s, f"{count} points of {run}/{tag}", poll_s=0.5)
        except HarnessError as e:
            raise HarnessError(f"{e}\nruns: {self.runs()} tags: {self.tags()}") from None
