"""Artifact store: datasets, adapters and checkpoints under one fsspec root, addressed by validated keys.

A key is a relative POSIX path made of plain segments (letters, digits, ``._-``). Anything else — ``..``,
absolute paths, backslashes, control characters, empty segments — is refused before it reaches the
filesystem. Writes go to a temporary key first and are moved into place, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

import fsspec
from fsspec.implementations.local import LocalFileSystem

MAX_KEY_LENGTH = 512
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TMP_MARK = ".tmp-"


class InvalidKeyError(ValueError):
    """A key that could escape the store or is not a plain relative path."""


class ArtifactNotFoundError(FileNotFoundError):
    """No artifact at that key."""


def validate_key(key: str) -> str:
    """Return ``key`` unchanged if it is a safe relative key, else raise ``InvalidKeyError`` saying why."""
    if not isinstance(key, str) or not key:
        raise InvalidKeyError("artifact key must be a non-empty string")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKeyError(f"artifact key is longer than {MAX_KEY_LENGTH} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in key):
        raise InvalidKeyError("artifact key contains a control character")
    if "\\" in key or ":" in key:
        raise InvalidKeyError(f"artifact key {key!r} contains '\\' or ':'; use '/'-separated plain names")
    if key.startswith("/"):
        raise InvalidKeyError(f"artifact key {key!r} is absolute; keys are relative to the store")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidKeyError(f"artifact key {key!r} has an empty, '.' or '..' segment")
        if not _SEGMENT.match(segment):
            raise InvalidKeyError(
                f"artifact key segment {segment!r} may hold only letters, digits, '.', '_' and '-' "
                "and must start with a letter or digit"
            )
    return key


def new_key(*parts: str) -> str:
    """A fresh key under ``parts`` ending in a generated name, so user-chosen names never become paths."""
    return validate_key("/".join([*parts, uuid.uuid4().hex]))


class ArtifactStore:
    """Put / get / exists / delete / list by key under one fsspec root URL (a local folder by default)."""

    def __init__(self, root_url: str) -> None:
        self.fs, root = fsspec.core.url_to_fs(root_url)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            root = os.path.realpath(root)
            os.makedirs(root, exist_ok=True)
        self.root = root.rstrip("/")

    def path(self, key: str) -> str:
        """The backend path of ``key``; on local disk also checked to resolve inside the root (no symlink escape)."""
        full = f"{self.root}/{validate_key(key)}"
        if self.is_local:
            resolved = os.path.realpath(full)
            if resolved != self.root and not resolved.startswith(self.root + os.sep):
                raise InvalidKeyError(f"artifact key {key!r} resolves outside the store")
        return full

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self.path(key)))

    def put_bytes(self, key: str, data: bytes) -> str:
        """Write ``data`` atomically at ``key``; returns its sha256."""
        with self.writer(key) as handle:
            handle.write(data)
        return hashlib.sha256(data).hexdigest()

    def put_file(self, key: str, local_path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
        """Stream a local file into the store atomically; returns its sha256."""
        digest = hashlib.sha256()
        with open(local_path, "rb") as source, self.writer(key) as handle:
            while chunk := source.read(chunk_size):
                digest.update(chunk)
                handle.write(chunk)
        return digest.hexdigest()

    @contextmanager
    def writer(self, key: str) -> Iterator[IO[bytes]]:
        """A binary handle whose content appears at ``key`` only if the block finishes without error."""
        final = self.path(key)
        tmp = f"{final}{_TMP_MARK}{uuid.uuid4().hex}"
        self.fs.makedirs(self.fs._parent(final), exist_ok=True)
        try:
            with self.fs.open(tmp, "wb") as handle:
                yield handle
                if self.is_local:
                    handle.flush()
                    os.fsync(handle.fileno())
            self.fs.mv(tmp, final)
        finally:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)

    def get_bytes(self, key: str) -> bytes:
        path = self.path(key)
        if not self.fs.exists(path):
            raise ArtifactNotFoundError(f"no artifact at {key!r}")
        return bytes(self.fs.cat_file(path))

    def open(self, key: str) -> IO[bytes]:
        path = self.path(key)
        if not self.fs.exists(path):
            raise ArtifactNotFoundError(f"no artifact at {key!r}")
        return self.fs.open(path, "rb")

    def get_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        """Copy the artifact at ``key`` to a local path (for libraries that need a file on disk)."""
        path = self.path(key)
        if not self.fs.exists(path):
            raise ArtifactNotFoundError(f"no artifact at {key!r}")
        self.fs.get(path, os.fspath(local_path))

    def delete(self, key: str) -> None:
        """Remove the file or folder at ``key``; a missing key is not an error."""
        path = self.path(key)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def list(self, prefix: str = "") -> list[str]:
        """Keys of all files under ``prefix`` (the whole store when empty), temporary files excluded."""
        base = self.path(prefix) if prefix else self.root
        if not self.fs.exists(base):
            return []
        found = self.fs.find(base)
        keys = [p[len(self.root) + 1 :] for p in (self.fs._strip_protocol(f) for f in found)]
        return sorted(k for k in keys if _TMP_MARK not in k)
