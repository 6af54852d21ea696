"""The private Ray session is authenticated and reachable on loopback only (cluster/auth.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from cluster import auth

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


@pytest.fixture
def no_cache_reset(monkeypatch):
    """Unit tests change the environment only: Ray's token cache in this process stays as it is."""
    monkeypatch.setattr(auth, "_forget_cached_token", lambda: None)
    for name in (auth.MODE_ENV, auth.TOKEN_ENV, auth.TOKEN_PATH_ENV):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_private_session_overrides_disabled_and_generates_a_token(no_cache_reset, tmp_path):
    no_cache_reset.setenv(auth.MODE_ENV, "disabled")
    no_cache_reset.setenv("HOME", str(tmp_path))
    token = auth.private_session_token()
    assert os.environ[auth.MODE_ENV] == "token"
    assert os.environ[auth.TOKEN_ENV] == token and len(token) == 64
    assert not (tmp_path / ".ray").exists()  # never written to disk
    assert auth.private_session_token() == token  # a second session of this process reuses it


def test_private_session_keeps_the_users_token(no_cache_reset, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("users-token\n")
    no_cache_reset.setenv(auth.TOKEN_PATH_ENV, str(token_file))
    assert auth.private_session_token() == "users-token"
    assert auth.TOKEN_ENV not in os.environ  # Ray reads the file itself
    assert auth.client_token() == ("users-token", f"{auth.TOKEN_PATH_ENV} ({token_file})")


@pytest.mark.ray
def test_private_session_refuses_clients_without_the_token(ray_session):
    address = ray_session.get_runtime_context().gcs_address
    host = address.rsplit(":", 1)[0]
    assert host == "127.0.0.1", f"the private session's GCS is at {address}, not on loopback"
    token = os.environ[auth.TOKEN_ENV]
    assert auth.probe_gcs(address, None) == "unauthenticated"
    assert auth.probe_gcs(address, "0" * 64) == "unauthenticated"
    assert auth.probe_gcs(address, token) == "ok"


@pytest.mark.ray
@pytest.mark.slow
def test_a_driver_with_the_token_joins_the_private_session(ray_session):
    address = ray_session.get_runtime_context().gcs_address
    code = ("import ray; ray.init(address=%r, namespace='x'); "
            "print('answer', ray.get(ray.remote(lambda: 41 + 1).remote()))" % address)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # else the client swaps 127.0.0.1 for the routable IP
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert "answer 42" in done.stdout, done.stderr[-3000:]


@pytest.mark.ray
def test_every_socket_of_the_private_session_is_on_loopback(ray_session):
    @ray_session.remote(num_cpus=0)
    class Probe:
        def pid(self) -> int:
            return os.getpid()

    actor = Probe.remote()
    worker = ray_session.get(actor.pid.remote())  # a worker that holds an actor listens too
    me = psutil.Process()
    processes = [me, *me.children(recursive=True)]
    assert worker in {p.pid for p in processes}
    names, exposed = set(), []
    for proc in processes:
        try:
            sockets = proc.net_connections(kind="inet")
            name = proc.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for s in sockets:
            bound = s.status == psutil.CONN_LISTEN or (s.type == 2 and not s.raddr)  # TCP listening, UDP bound
            if bound:
                names.add(name)
                if s.laddr.ip not in LOOPBACK:
                    exposed.append(f"{name} (pid {proc.pid}) on {s.laddr.ip}:{s.laddr.port}")
    ray_session.kill(actor)
    assert {"gcs_server", "raylet"} <= names  # the check saw the session's servers
    assert exposed == []
