"""The Files store of the Batch API, and the data directory it lives in.

Layout of a data directory (``flotilla serve --batch-data-dir``)::

    DATA/.lock                       held (flock) by the one server using the directory
    DATA/files/<file id>.jsonl       a file's content
    DATA/files/<file id>.json        its OpenAI ``file`` object
    DATA/batches/<batch id>.json     a batch's OpenAI ``batch`` object
    DATA/batches/<batch id>/         a running batch's output.jsonl and errors.jsonl

Every JSON state file is replaced atomically (written to a temporary file, fsynced, ``os.replace``d), so a
server killed at any point leaves either the old or the new state, never a torn one. Content files are
written under a temporary name and renamed into place the same way. One process owns a directory at a time:
``DataDir`` takes an exclusive ``flock`` (released by the kernel when the process dies, SIGKILL included);
a second server on the same directory gets ``DataDirBusy``.

Errors are ``StoreError(status, message, param)`` with an HTTP-like status (404 unknown id, 400 invalid); the
entrypoints layer answers them as OpenAI errors.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
import uuid
from typing import BinaryIO

FILE_PURPOSES = ("batch", "batch_output")


class StoreError(Exception):
    """A request the store refuses: ``status`` 404 (unknown id) or 400 (invalid), naming ``param``."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


class DataDirBusy(Exception):
    """Another process holds the data directory."""


def atomic_write_json(path: str, obj) -> None:
    """Replace ``path`` with ``obj`` as JSON, atomically (see the module docstring)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class DataDir:
    """The directory tree above, created if missing and locked for this process until ``close()``."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.files = os.path.join(self.root, "files")
        self.batches = os.path.join(self.root, "batches")
        for d in (self.root, self.files, self.batches):
            os.makedirs(d, exist_ok=True)
        self._lock = open(os.path.join(self.root, ".lock"), "a+")
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise DataDirBusy(f"the batch data directory {self.root} is in use by another flotilla serve "
                              f"(--batch-data-dir names another one)") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"{os.getpid()}\n")
        self._lock.flush()

    def close(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
            self._lock.close()

    def tmp_path(self, where: str) -> str:
        return os.path.join(where, f".tmp-{uuid.uuid4().hex}")


class FileStore:
    """OpenAI ``file`` objects and their contents under ``data.files`` (index kept in memory; one owner)."""

    def __init__(self, data: DataDir):
        self.data = data
        self._files: dict[str, dict] = {}
        for name in os.listdir(data.files):
            if name.endswith(".json") and not name.startswith(".tmp-"):
                obj = read_json(os.path.join(data.files, name))
                if os.path.exists(self.content_path(obj["id"])):
                    self._files[obj["id"]] = obj
        for name in os.listdir(data.files):  # temporaries of an interrupted upload
            if name.startswith(".tmp-"):
                os.unlink(os.path.join(data.files, name))

    def content_path(self, file_id: str) -> str:
        return os.path.join(self.data.files, f"{file_id}.jsonl")

    def _meta_path(self, file_id: str) -> str:
        return os.path.join(self.data.files, f"{file_id}.json")

    def new_upload(self) -> str:
        """A temporary path in the files directory to write an upload to (then ``add`` it)."""
        return self.data.tmp_path(self.data.files)

    def add(self, tmp_path: str, filename: str, purpose: str, file_id: str | None = None) -> dict:
        """Move the finished content at ``tmp_path`` (on the same filesystem) into the store; returns the file
        object. ``file_id``: a fixed id (a batch's outputs); adding it again is a no-op that returns it."""
        file_id = file_id or f"file-{time.time_ns():016x}{uuid.uuid4().hex[:12]}"
        if file_id in self._files:
            return self._files[file_id]
        if os.path.exists(tmp_path):
            os.replace(tmp_path, self.content_path(file_id))
        obj = {"id": file_id, "object": "file", "bytes": os.path.getsize(self.content_path(file_id)),
               "created_at": int(time.time()), "filename": filename, "purpose": purpose, "status": "processed",
               "expires_at": None, "status_details": None}
        atomic_write_json(self._meta_path(file_id), obj)
        self._files[file_id] = obj
        return obj

    def get(self, file_id: str) -> dict:
        obj = self._files.get(file_id)
        if obj is None:
            raise StoreError(404, f"No such File object: {file_id}", "file_id")
        return obj

    def open(self, file_id: str) -> BinaryIO:
        self.get(file_id)
        return open(self.content_path(file_id), "rb")

    def delete(self, file_id: str) -> dict:
        self.get(file_id)
        os.unlink(self._meta_path(file_id))  # first: a crash in between leaves content without metadata
        del self._files[file_id]
        if os.path.exists(self.content_path(file_id)):
            os.unlink(self.content_path(file_id))
        return {"id": file_id, "object": "file", "deleted": True}

    def list(self, purpose: str | None = None, limit: int = 10000, order: str = "desc",
             after: str | None = None) -> tuple[list[dict], bool]:
        """``(files, has_more)`` sorted by ``created_at`` (``order`` asc/desc), from the one after ``after``."""
        items = [f for f in self._files.values() if purpose is None or f["purpose"] == purpose]
        items.sort(key=lambda f: (f["created_at"], f["id"]), reverse=order == "desc")
        return page(items, after, limit)


def page(items: list[dict], after: str | None, limit: int) -> tuple[list[dict], bool]:
    """Cursor pagination: the ``limit`` items after the one whose id is ``after`` (400 if unknown)."""
    start = 0
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise StoreError(400, f"after: no object with id {after!r}", "after")
        start = ids.index(after) + 1
    return items[start:start + limit], start + limit < len(items)


def copy_into(src: BinaryIO, path: str) -> int:
    """Copy a stream to ``path``; returns the bytes written."""
    with open(path, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
        dst.flush()
        os.fsync(dst.fileno())
        return dst.tell()
