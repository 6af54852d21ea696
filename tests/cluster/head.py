"""A private Ray head for tests: its own temp dir and token, free ports, every socket on 127.0.0.1.

It is stopped by the PIDs of its own processes (every one of them names the head's temp dir on its
command line), never with ``ray stop``, which would kill every Ray on the machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import psutil


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalHead:
    def __init__(self, num_cpus: int = 2) -> None:
        # Short path: Ray's unix sockets live under the temp dir and have a 107-byte limit.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rph-", dir="/tmp"))
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.num_cpus = num_cpus
        # Token authentication with a token of its own (`ray start` needs one before it starts), and
        # Ray's single-machine mode, without which --node-ip-address=127.0.0.1 becomes the routable IP.
        self.token = secrets.token_hex(32)
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
            self.env.pop(name, None)

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers that authenticate a client (JobSubmissionClient) to this head."""
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, attempts: int = 3) -> LocalHead:
        """Start the head; a port taken between picking it and binding it costs a retry, not a failure."""
        for attempt in range(attempts):
            done = self._ray_start()
            if done.returncode == 0:
                self._wait_for_dashboard()
                return self
            self.stop()
            self.gcs_port, self.dashboard_port = free_port(), free_port()
        raise RuntimeError(f"ray start failed {attempts} times; last stderr:\n{done.stderr[-3000:]}")

    def _ray_start(self) -> subprocess.CompletedProcess:
        self.temp_dir.mkdir(exist_ok=True)  # stop() removes it: a retry starts clean
        ray = str(Path(sys.executable).with_name("ray"))
        cmd = [ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
               f"--num-cpus={self.num_cpus}", "--num-gpus=0", f"--temp-dir={self.temp_dir}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
               f"--ray-client-server-port={free_port()}", f"--node-manager-port={free_port()}",
               f"--object-manager-port={free_port()}", "--object-store-memory=200000000", "--disable-usage-stats"]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)

    def _wait_for_dashboard(self, timeout: float = 60) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                request = urllib.request.Request(f"{self.dashboard_url}/api/version", headers=self.headers)
                with urllib.request.urlopen(request, timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"the Ray dashboard at {self.dashboard_url} did not come up")

    def pids(self) -> list[int]:
        """Every process of this head: each names our temp dir or our GCS port on its command line."""
        marks = (str(self.temp_dir), f":{self.gcs_port}")
        mine = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                line = " ".join(proc.info["cmdline"] or ())
                if any(mark in line for mark in marks) and proc.info["pid"] != os.getpid():
                    mine.append(proc.info["pid"])
                    # Agents and workers rename themselves (ray::DashboardAgent): take the children too.
                    mine += [child.pid for child in proc.children(recursive=True)]
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return sorted(set(mine))

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.3)
            if not self.pids():
                break
        shutil.rmtree(self.temp_dir, ignore_errors=True)
