"""Run directories on shared storage: ``output`` may be a path or a URI (``s3://``, ``gs://``, ``hdfs://``).

A path (local disk or a shared mount such as NFS) is used as it is. For a URI the campaign works in
a local staging directory, the way Ray Train and Tune treat ``storage_path``:

- before it starts, whatever the URI already holds is pulled into the staging directory, so a
  campaign resumes on any node from the evaluations that reached the storage;
- while it runs, a background thread mirrors the staging directory to the URI every
  ``interval_s`` seconds (new and changed files uploaded, deleted ones deleted: the cache's
  compaction replaces its parts), so a lost driver node loses at most that interval of results;
- when it ends (finished or failed) the directory is mirrored once more.

Files whose name starts with a dot (the run lock, files being written) are never uploaded. The run
lock guards the staging directory on one machine only: do not start two drivers on one URI.

Credentials never travel in the URI: one with a password (``user:secret@``) or a secret query
parameter (``?secret_key=...``) is refused before anything starts, since the URI is written to
``config.yaml`` and the logs. pyarrow takes them from the environment (``AWS_ACCESS_KEY_ID`` and
``AWS_SECRET_ACCESS_KEY``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...). Logs show :func:`redact_uri`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import contextlib
import threading
from urllib.parse import parse_qsl, urlsplit
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .files import REMOVED, atomic_write, write_via

if TYPE_CHECKING:
    from pyarrow.fs import FileSystem

log = logging.getLogger("rayprune")

#: URI schemes that pyarrow.fs opens (credentials come from the environment, as for pyarrow).
SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")


def uri_scheme(output: str) -> str | None:
    """The scheme of a URI (``s3`` of ``s3://b/p``); None for a plain path."""
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", output)
    return match.group(1).lower() if match else None


#: Query parameters that carry a secret (pyarrow's S3 ``secret_key``, Azure's ``sas_token``, ...).
_SECRET_PARAM = re.compile(r"key|secret|token|password|passwd|credential|signature|sig$|sas", re.IGNORECASE)


def _secrets(uri: str) -> list[str]:
    """The parts of ``uri`` that carry credentials: a password, secret query parameters."""
    parts = urlsplit(uri)
    found = ["a password (user:password@)"] if parts.password else []
    found += [f"the query parameter {k}" for k, _ in parse_qsl(parts.query, keep_blank_values=True)
              if _SECRET_PARAM.search(k)]
    return found


def redact_uri(uri: str) -> str:
    """``uri`` as it may be shown: a password and secret query values replaced by ``***``."""
    if uri_scheme(uri) is None:
        return uri
    parts = urlsplit(uri)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    query = "&".join(f"{k}={'***' if _SECRET_PARAM.search(k) else v}"
                     for k, v in parse_qsl(parts.query, keep_blank_values=True))
    return parts._replace(netloc=netloc, query=query).geturl()


def uri_problem(output: str) -> str | None:
    """Why ``output`` is not a URI rayprune can write to (None when the scheme is supported and the
    URI carries no credentials)."""
    scheme = uri_scheme(output)
    if scheme is not None and scheme not in SCHEMES:
        return (f"output: {redact_uri(output)!r} uses the scheme {scheme}://, which pyarrow.fs cannot open; use a "
                f"path (a shared mount) or one of {', '.join(s + '://' for s in SCHEMES)}")
    if scheme is not None and (found := _secrets(output)):
        return (f"output: {redact_uri(output)!r} carries credentials ({', '.join(found)}), which would be written "
                f"to config.yaml and the logs; remove them from the URI and give them through the environment "
                f"(e.g. AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for s3://, GOOGLE_APPLICATION_CREDENTIALS "
                f"for gs://)")
    return None


def canonical_uri(output: str) -> str:
    """One spelling per location: ``s3://b/runs/x/`` and ``s3://b/runs/x`` are the same run."""
    if uri_scheme(output) is None:
        return output
    scheme, _, rest = output.partition("://")
    return f"{scheme.lower()}://{rest.rstrip('/')}"


def staging_dir(output: str) -> Path:
    """The local working copy of a URI run directory: under rayprune's cache, one per location."""
    from actors.models import cache_dir

    output = canonical_uri(output)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", output.rsplit("/", 1)[-1]) or "run"
    return cache_dir() / "staging" / f"{name}-{hashlib.sha256(output.encode()).hexdigest()[:12]}"


def _copy(src: Any, dst: Any) -> None:
    while chunk := src.read(1 << 22):
        dst.write(chunk)


class RunStorage:
    """Where a run directory lives. ``local`` is the directory the campaign writes to."""

    def __init__(self, output: str, *, interval_s: float = 60.0) -> None:
        self.output, self.interval_s = canonical_uri(output), interval_s
        self.shown = redact_uri(self.output)  # what logs and errors say
        self.remote = uri_scheme(output) is not None
        self.local = staging_dir(self.output) if self.remote else Path(output)
        self._fs: FileSystem | None = None
        self._root = ""
        self._pushed: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) last uploaded
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"RunStorage({self.shown!r}{f', staged in {str(self.local)!r}' if self.remote else ''})"

    # ---- the remote side ----------------------------------------------------------------------------
    def _open(self) -> tuple[FileSystem, str]:
        if self._fs is None:
            from pyarrow.fs import FileSystem

            if problem := uri_problem(self.output):
                raise ValueError(problem)
            try:
                self._fs, self._root = FileSystem.from_uri(self.output)
            except Exception as exc:  # noqa: BLE001 - pyarrow raises OSError/ArrowInvalid for bad URIs and credentials
                raise ValueError(f"output: {self.shown!r} cannot be opened ({exc}); check the URI and the storage "
                                 f"credentials in the environment") from exc
            self._root = self._root.rstrip("/")
        return self._fs, self._root

    def _remote_files(self) -> dict[str, int]:
        from pyarrow.fs import FileSelector, FileType

        fs, root = self._open()
        infos = fs.get_file_info(FileSelector(root, recursive=True, allow_not_found=True))
        return {info.path[len(root) + 1:]: info.size for info in infos if info.type == FileType.File}

    def _local_files(self) -> dict[str, tuple[int, int]]:
        files = {}
        for path in self.local.rglob("*"):
            rel = path.relative_to(self.local)
            if path.is_file() and not any(part.startswith(".") for part in rel.parts):
                stat = path.stat()
                files[rel.as_posix()] = (stat.st_size, stat.st_mtime_ns)
        return files

    # ---- sync -----------------------------------------------------------------------------------------
    def pull(self) -> int:
        """Copy what the URI holds into the staging directory (resume); returns the number of files."""
        if not self.remote:
            return 0
        fs, root = self._open()
        remote = self._remote_files()
        self.local.mkdir(parents=True, exist_ok=True)
        for rel in remote:
            with fs.open_input_stream(f"{root}/{rel}") as src:
                write_via(self.local / rel, lambda dst: _copy(src, dst))
        self._pushed = {rel: meta for rel, meta in self._local_files().items() if rel in remote}
        if remote:
            log.info("resuming from %s: %d files pulled into %s", self.shown, len(remote), self.local)
        return len(remote)

    def push(self) -> int:
        """Mirror the staging directory to the URI; returns the number of files uploaded.

        New and changed files are uploaded. A remote file is deleted only when this run deleted it
        locally on purpose (its name is in a ``.removed`` journal, :func:`orchestrator.files.remove`),
        never because it is missing locally: a vanished or emptied staging directory deletes nothing.
        """
        if not self.remote:
            return 0
        if not self.local.is_dir():
            log.warning("the staging directory %s is gone; nothing was mirrored, and %s keeps what it holds",
                        self.local, self.shown)
            return 0
        with self._lock:
            fs, root = self._open()
            local = self._local_files()
            uploaded = 0
            for rel, meta in sorted(local.items()):
                if self._pushed.get(rel) == meta:
                    continue
                fs.create_dir(f"{root}/{rel}".rsplit("/", 1)[0], recursive=True)
                try:
                    with open(self.local / rel, "rb") as src, fs.open_output_stream(f"{root}/{rel}") as dst:
                        _copy(src, dst)
                except FileNotFoundError:  # replaced or merged since it was listed: the next mirror has it
                    continue
                self._pushed[rel] = meta
                uploaded += 1
            self._delete_removed(fs, root, local)
            return uploaded

    def _delete_removed(self, fs: FileSystem, root: str, local: dict[str, tuple[int, int]]) -> None:
        """Delete remotely what the run deleted locally on purpose; then empty the journals."""
        remote = self._remote_files()
        for journal in self.local.rglob(REMOVED):
            folder = journal.parent.relative_to(self.local)
            names = {n for n in journal.read_text(encoding="utf-8").split("\n") if n}
            for name in names:
                rel = (folder / name).as_posix()
                if rel in remote and rel not in local:
                    fs.delete_file(f"{root}/{rel}")
                self._pushed.pop(rel, None)
            left = {n for n in journal.read_text(encoding="utf-8").split("\n") if n} - names  # added meanwhile
            if left:
                atomic_write(journal, "\n".join(sorted(left)) + "\n")
            else:
                journal.unlink(missing_ok=True)

    def __enter__(self) -> RunStorage:
        """Pull, then mirror in the background until the block ends; the final mirror runs on exit."""
        self.pull()
        if self.remote:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="rayprune-storage", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if not self.remote:  # no mirror reads the journals of deleted files: they are done with
            for journal in self.local.rglob(REMOVED) if self.local.is_dir() else ():
                journal.unlink(missing_ok=True)
            return
        try:
            n = self.push()
        except Exception as exc:
            log.error("mirroring to %s failed (%s); every result is kept in %s, and rerunning the campaign "
                      "retries the upload", self.shown, exc, self.local)
            if exc_type is None:
                raise
            return  # the campaign's own error is the one to see
        log.info("run directory mirrored to %s (%d files uploaded)", self.shown, n)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.push()
            except Exception as exc:  # noqa: BLE001 - a storage hiccup must not stop the campaign
                log.warning("mirroring to %s failed (%s); retrying in %.0f s", self.shown, exc, self.interval_s)


@contextlib.contextmanager
def local_run(spec: str, *, write_back: bool = False) -> Iterator[Path]:
    """A run directory named by a path or a URI, as a local path: a URI is pulled into its staging
    directory first (and, with ``write_back``, what the command wrote is mirrored back after)."""
    if uri_scheme(spec) is None:
        yield Path(spec)
        return
    if problem := uri_problem(spec):
        raise ValueError(problem)
    storage = RunStorage(spec)
    if storage.pull() == 0:
        raise ValueError(f"{storage.shown} holds no run directory; check the URI (and the credentials in the "
                         f"environment)")
    yield storage.local
    if write_back:
        storage.push()
