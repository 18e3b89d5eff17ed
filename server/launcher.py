"""Start `python -m server` as a child process on a free loopback port and wait until it is ready.

Used by the tests and the load tests; handy for anyone scripting a local server. Standard library only.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    def __init__(self, model_dir: str | Path, log_path: str | Path, workers: int = 1,
                 extra_args: list[str] | None = None, env: dict[str, str] | None = None, start_timeout_s: float = 120,
                 repository: bool = False, port: int | None = None, cpus: set[int] | None = None):
        """`cpus`: the CPU numbers the server (and the workers it forks) may run on; None: any."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/stream"
        self.log_path = Path(log_path)
        self.log = open(self.log_path, "w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server", "--models" if repository else "--model", str(model_dir), "--port", str(self.port), "--workers",
             str(workers), "--log-level", "warning", *(extra_args or [])],
            cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        deadline = time.monotonic() + start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready within {start_timeout_s} s: {self.output()}")

    def output(self) -> str:
        """The tail of the server's log."""
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
