"""Ray token authentication and loopback binding for the sessions rayprune starts or joins.

A Ray session without authentication lets anyone who reaches one of its ports run code as its
user. So:

- rayprune's **private session** (no ``RAY_ADDRESS``) always runs with token authentication
  (``RAY_AUTH_MODE=token``; a ``disabled`` in the environment is overridden, with a warning). Its
  token is the user's (``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``) if set, else a fresh random
  one held only in the environment of the driver and of the processes it starts: nothing is
  written to disk (Ray's own ``~/.ray/auth_token`` is created world-readable). Every socket of the
  session is bound to 127.0.0.1 (:func:`loopback_only`).
- **Joining a cluster** (``RAY_ADDRESS``): the GCS is asked first, with the token this process
  would present, whether it accepts it (:func:`check_cluster_access`). A refusal becomes one
  error that says where the token goes, instead of a ``ray.init`` that hangs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from pathlib import Path
from typing import Iterator

log = logging.getLogger("rayprune")

MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
#: Ray's switch for "this machine is not part of a cluster": node IP = loopback (read in ray_constants).
_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

TOKEN_HELP = (f"put the cluster's token (print it with `ray get-auth-token` on the head node) in the environment "
              f"variable {TOKEN_ENV}, or in a file named by {TOKEN_PATH_ENV}, or in ~/.ray/auth_token; on KubeRay, "
              f"set {TOKEN_ENV} from the cluster's token secret (cluster/kuberay-rayjob.yaml)")


class ClusterAuthError(PermissionError):
    """The Ray cluster refused this process's token (or its lack of one)."""


def default_token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"


def client_token() -> tuple[str | None, str]:
    """The token a Ray client in this process presents, and where it comes from (Ray's precedence:
    ``RAY_AUTH_TOKEN``, then the file ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``)."""
    if token := os.environ.get(TOKEN_ENV, "").strip():
        return token, TOKEN_ENV
    for path, where in ((os.environ.get(TOKEN_PATH_ENV), TOKEN_PATH_ENV), (str(default_token_path()), None)):
        if not path:
            continue
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError:
            continue
        if token:
            return token, f"{where} ({path})" if where else path
    return None, "no token"


def probe_gcs(address: str, token: str | None, *, timeout_s: float = 10.0) -> str:
    """Ask the GCS at ``host:port`` who it lets in: ``"ok"``, ``"unauthenticated"`` or
    ``"unreachable"``. One cheap RPC (GetClusterId), sent with ``token`` or without any."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                return "unauthenticated"
            return "unreachable"
    return "ok"


def _gcs_address(ray_address: str) -> str | None:
    """The GCS ``host:port`` behind ``RAY_ADDRESS``; None where it is not a GCS address (``ray://``
    clients, dashboard URLs) or cannot be resolved (``auto`` with no running cluster)."""
    if "://" in ray_address:
        return None
    if ray_address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            return canonicalize_bootstrap_address("auto")
        except (ConnectionError, ValueError):
            return None
    return ray_address


def check_cluster_access(ray_address: str) -> None:
    """Raise :class:`ClusterAuthError` (with the fix) when the cluster at ``ray_address`` refuses
    the token this process would present; do nothing when it accepts it or cannot be asked."""
    address = _gcs_address(ray_address)
    if address is None:
        return
    token, source = client_token()
    if probe_gcs(address, token) != "unauthenticated":
        return
    found = f"the token from {source} was refused" if token else "this process has no token"
    raise ClusterAuthError(f"the Ray cluster at {ray_address} requires token authentication and {found}; "
                           f"{TOKEN_HELP}")


def private_session_token() -> str:
    """Turn on token authentication for a session this process starts; returns its token.

    The user's token (``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH``) is kept; otherwise a fresh
    random token goes into ``RAY_AUTH_TOKEN``, inherited by the session's processes only.
    """
    mode = os.environ.get(MODE_ENV, "")
    if mode.lower() != "token":
        if mode:
            log.warning("%s=%s is ignored: rayprune's private Ray session always runs with token authentication",
                        MODE_ENV, mode)
        os.environ[MODE_ENV] = "token"
    token, _ = client_token() if (os.environ.get(TOKEN_ENV) or os.environ.get(TOKEN_PATH_ENV)) else (None, "")
    if not token:
        token = secrets.token_hex(32)
        os.environ[TOKEN_ENV] = token
    _forget_cached_token()
    return token


def _forget_cached_token() -> None:
    """Ray's C++ token loader caches the first token it reads: make it read the environment again."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token authentication: nothing is cached
        return
    Config.initialize("")  # re-reads RAY_AUTH_MODE
    AuthenticationTokenLoader.instance().reset_cache()


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Start a local session on 127.0.0.1: GCS, raylet, workers, agents and the driver bind to it.

    Ray binds its servers to the node IP, which ``ray.init`` resolves to the machine's routable
    address even when told 127.0.0.1; with cluster mode off (Ray's setting for single machines),
    the node IP is the loopback address. Processes started inside inherit the setting.
    """
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(_SINGLE_NODE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_SINGLE_NODE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_SINGLE_NODE_ENV, None)
        else:
            os.environ[_SINGLE_NODE_ENV] = saved_env
