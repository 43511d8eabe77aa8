"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

Every file the project writes that someone may read while it is being
written, or after a crash (checkpoint files, shards, manifests, configs,
metrics, reports), goes through :class:`AtomicFile` (or its shorthands
:func:`atomic_write`, :func:`atomic_json`, :func:`atomic_save`):

    write .NAME.tmp.PID  ->  flush + fsync  ->  rename onto PATH  ->  fsync the folder

The fsync before the rename makes sure the renamed file has its bytes (else a
power loss can leave an empty file under the final name); the folder's fsync
makes the rename itself durable. A failed write (a full disk) removes the
temporary file and re-raises: nothing half-written is left behind and the old
file, if any, is untouched.
"""
from __future__ import annotations

import json
import os
import re
from typing import IO, Any, Callable, Union


_TMP = re.compile(r"^\..+\.tmp\.\d+$")


def temporary_path(path: str) -> str:
    """Where ``path`` is written before its rename: ``.NAME.tmp.PID`` beside it,
    hidden, so that nothing listing the folder takes it for the real file."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.tmp.{os.getpid()}")


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`temporary_path`'s (left by a killed writer)."""
    return bool(_TMP.match(name))


def fsync_dir(folder: str) -> None:
    """Make a rename (or a new file) in ``folder`` durable. A no-op where the
    platform or file system cannot open a folder for fsync."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some network file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


class AtomicFile:
    """A file written under :func:`temporary_path`: :meth:`commit` moves it
    onto ``path`` atomically and durably, :meth:`discard` removes it. As a
    context manager (it yields the open file) it commits on a clean exit and
    discards on an error.

    ``mode``: 'w' (text, ``encoding``) or 'wb'.
    """

    def __init__(self, path: str, mode: str = "w", encoding: str = "utf-8"):
        if mode not in ("w", "wb"):
            raise ValueError(f"AtomicFile: mode must be 'w' or 'wb', got {mode!r}")
        self.path, self.tmp = path, temporary_path(path)
        self.file: IO = open(self.tmp, mode, **({} if "b" in mode else {"encoding": encoding}))

    def commit(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()  # a full disk leaves no half-written file behind
            raise
        fsync_dir(os.path.dirname(self.path))

    def discard(self) -> None:
        self.file.close()
        remove_quietly(self.tmp)

    def __enter__(self) -> IO:
        return self.file

    def __exit__(self, exc_type, *_: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def atomic_write(path: str, data: Union[str, bytes]) -> None:
    """Write ``data`` (text or bytes) to ``path`` atomically and durably."""
    with AtomicFile(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def atomic_json(path: str, obj: Any, **dump_kwargs: Any) -> None:
    """``json.dump(obj)`` to ``path`` atomically (``indent=1`` unless given)."""
    dump_kwargs.setdefault("indent", 1)
    atomic_write(path, json.dumps(obj, **dump_kwargs))


def atomic_save(path: str, save: Callable[[str], None]) -> None:
    """Let ``save(tmp_path)`` write a file (``torch.save``), then move it onto
    ``path`` atomically and durably. The writer gets a path, not a file
    object, so that its own error reporting (torch's for a full disk) is
    unchanged; it must write exactly that path (``np.save`` appends '.npy':
    give it an :class:`AtomicFile`'s file instead)."""
    tmp = temporary_path(path)
    try:
        save(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    fsync_dir(os.path.dirname(path))
