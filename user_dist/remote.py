"""Opening shards where they live: local paths, ``http(s)://``, ``pipe:COMMAND``
and any fsspec URL (``s3://``, ``gs://``, ...).

- Local paths: a buffered file.
- ``http(s)://``: the standard library's ``urllib`` with a socket timeout, so
  a server that stalls raises after ``timeout`` seconds instead of hanging;
  connection failures and HTTP 429 / 5xx answers are retried ``retries``
  times (with backoff) before the shard is opened, never in the middle of one.
  A body shorter than its Content-Length raises. (webdataset's own http opener
  runs ``curl`` without a read timeout: a stalled server would hang a worker.)
- ``pipe:COMMAND``: webdataset's ``gopen`` runs the command in a shell and
  reads its stdout; a command that exits with an error status raises once its
  output is read. The command owns its own timeouts (``curl --max-time``,
  ``aws s3 cp --cli-read-timeout``).
- anything else with a scheme: ``fsspec.open`` (``pip install
  'user-dist[remote]'`` brings fsspec with s3fs and gcsfs).

Every failure is an :class:`OSError` whose message names the URL.
"""
from __future__ import annotations

import contextlib
import os
import re
import time
import urllib.error
import urllib.request
from typing import BinaryIO, Iterator, Optional
from urllib.parse import urlparse

class NotFound(FileNotFoundError):
    """The shard or file does not exist there (a missing local file, HTTP 404 / 403 / 410)."""


# A finished pipe: command's output is read this far past the tar's end (its padding is at most
# one 10 KiB record) before the command is stopped rather than waited for.
_DRAIN_READS, _DRAIN_BYTES = 4, 1 << 14
# Answers worth another try: rate limits and server-side failures.
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


def is_url(path: str) -> bool:
    """True for 'pipe:...' and 'scheme://...' (a Windows drive letter is not a scheme here)."""
    return path.startswith("pipe:") or bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+://", path))


def local_path(url: str) -> Optional[str]:
    """The file path of a local shard ('file://' URLs included), or None for a remote one."""
    if url.startswith("file://"):
        return urlparse(url).path
    return None if is_url(url) else url


class _CheckedStream:
    """A read-only stream that raises when it ends before ``expected`` bytes (a cut-off HTTP body)."""

    def __init__(self, raw, url: str, expected: Optional[int]):
        self.raw, self.url, self.expected, self.got = raw, url, expected, 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.raw.read(n)
        except (OSError, ValueError, EOFError) as exc:  # socket timeout, reset, IncompleteRead
            raise OSError(f"{self.url}: reading failed after {self.got} bytes ({exc!r})") from exc
        self.got += len(data)
        if not data and n != 0 and self.expected is not None and self.got < self.expected:
            raise OSError(f"{self.url}: the server sent {self.got} of {self.expected} bytes and closed the "
                          "connection (cut off)")
        return data

    def close(self) -> None:
        self.raw.close()


class _PipeStream:
    """stdout of a ``pipe:`` command (webdataset's Pipe): a failed command raises, an abandoned read
    stops the command quietly."""

    def __init__(self, url: str):
        from webdataset.gopen import gopen

        self.url, self.pipe, self.ended = url, gopen(url, "rb"), False

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.pipe.read(n)
        except OSError as exc:  # Pipe.read raises when the command has exited with an error status
            raise OSError(f"{self.url}: the command failed ({exc})") from exc
        if not data and n != 0:
            self.ended = True
        return data

    def close(self) -> None:
        if not self.ended:
            # A tar's reader stops at the end-of-archive marker, before the padding that may follow
            # it: read that much more, so that a complete read still learns the command's status.
            for _ in range(_DRAIN_READS):
                if not self.read(_DRAIN_BYTES):
                    break
        if not self.ended:  # stopped early: the command may block on a full pipe, so stop it
            self.pipe.proc.kill()
            self.pipe.stream.close()
            self.pipe.proc.wait()
            return
        try:
            self.pipe.close()  # waits for the command; raises on an error status
        except OSError as exc:
            raise OSError(f"{self.url}: the command failed ({exc})") from exc


def _open_http(url: str, timeout: float, retries: int):
    for attempt in range(retries + 1):
        try:
            response = urllib.request.urlopen(url, timeout=timeout)
        except urllib.error.HTTPError as exc:
            if exc.code in (403, 404, 410):
                raise NotFound(f"{url}: HTTP {exc.code} {exc.reason}") from exc
            if exc.code not in _RETRY_STATUS or attempt == retries:
                raise OSError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, OSError) as exc:
            if attempt == retries:
                raise OSError(f"{url}: cannot connect ({getattr(exc, 'reason', exc)}) after {retries + 1} tries")
        else:
            length = response.headers.get("Content-Length")
            return _CheckedStream(response, url, int(length) if length is not None else None)
        time.sleep(min(0.5 * 2 ** attempt, 10.0))


@contextlib.contextmanager
def open_shard(url: str, timeout: float = 60.0, retries: int = 3) -> Iterator[BinaryIO]:
    """A binary read stream of a shard, closed (and, for a pipe, waited for) at the end.

    timeout: seconds a remote read may wait for data; retries: extra tries to open an http(s) URL.
    Raises:
        OSError: naming the URL (missing file, HTTP error, cut-off body, failed command, no fsspec).
    """
    path = local_path(url)
    if path is not None:
        try:
            stream = open(path, "rb", buffering=1 << 20)
        except FileNotFoundError as exc:
            raise NotFound(f"{url}: no such file") from exc
        except OSError as exc:
            raise OSError(f"{url}: cannot open ({exc.strerror or exc})") from exc
    elif url.startswith("pipe:"):
        stream = _PipeStream(url)
    elif url.startswith(("http://", "https://")):
        stream = _open_http(url, timeout, retries)
    else:
        try:
            import fsspec
        except ImportError as exc:
            raise OSError(f"{url}: reading this URL needs fsspec and the scheme's library; "
                          "pip install 'user-dist[remote]' (s3fs, gcsfs)") from exc
        try:
            stream = fsspec.open(url, "rb").open()
        except FileNotFoundError as exc:
            raise NotFound(f"{url}: no such object") from exc
        except (ImportError, ValueError) as exc:
            raise OSError(f"{url}: fsspec cannot open this URL ({exc}); pip install 'user-dist[remote]' or the "
                          "filesystem's package") from exc
    try:
        yield stream  # type: ignore[misc]
    finally:
        stream.close()


def read_small(url: str, timeout: float = 60.0, retries: int = 3) -> Optional[bytes]:
    """The bytes of a small file (e.g. img2dataset's *_stats.json), or None when it does not exist
    (a local file that is missing, HTTP 404/403). Other failures raise OSError."""
    path = local_path(url)
    if path is not None:
        if not os.path.isfile(path):
            return None
    elif url.startswith("pipe:"):
        return None  # a command has no neighbour files
    try:
        with open_shard(url, timeout, retries) as f:
            return f.read()
    except NotFound:
        return None
