"""A real HTTP server on 127.0.0.1 for shard tests, and web-style (img2dataset layout) shards.

``ShardServer(root)`` serves the files under ``root`` from a thread, with
Content-Length. Faults, per file name: ``cut[name] = n`` sends the full
Content-Length but only the first n bytes, then closes the connection;
``stall[name] = n`` sends n bytes and then waits (a server that hangs);
``fail[name] = k`` answers 503 to the first k requests. ``requests`` counts
the requests per path. Run it in the test process (``with ShardServer(dir)
as server: server.url(name)``) or as a process: ``python tests/http_shards.py
ROOT PORT_FILE`` writes its port to PORT_FILE and serves until killed.
"""
from __future__ import annotations

import collections
import io
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Sequence

import numpy as np


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        owner = self.server.owner
        name = self.path.lstrip("/")
        owner.requests[name] += 1
        if owner.fail.get(name, 0) > 0:
            owner.fail[name] -= 1
            self.send_error(503, "try again")
            return
        path = os.path.join(owner.root, name)
        if not os.path.isfile(path):
            self.send_error(404, "no such file")
            return
        with open(path, "rb") as f:
            data = f.read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if name in owner.cut:
            self.wfile.write(data[:owner.cut[name]])
            self.wfile.flush()
            self.close_connection = True
            return
        if name in owner.stall:
            self.wfile.write(data[:owner.stall[name]])
            self.wfile.flush()
            owner.release.wait(600)
            return
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: "ShardServer"


class ShardServer:
    def __init__(self, root: str, port: int = 0):
        self.root = root
        self.cut: Dict[str, int] = {}
        self.stall: Dict[str, int] = {}
        self.fail: Dict[str, int] = {}
        self.requests: Dict[str, int] = collections.Counter()
        self.release = threading.Event()
        self.httpd = _Server(("127.0.0.1", port), _Handler)
        self.httpd.owner = self
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def __enter__(self) -> "ShardServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


# --------------------------------------------------------------------------- web-style shards


def jpeg_bytes(rng: np.random.Generator, fmt: str = "JPEG", size: Optional[tuple] = None) -> bytes:
    """An image of random size (256..512 px a side) with a gradient, noise and a box, encoded as fmt."""
    from PIL import Image

    w, h = size or (int(rng.integers(256, 513)), int(rng.integers(256, 513)))
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], axis=-1).astype(np.int32)
    noisy = np.clip(base + rng.integers(-20, 21, size=base.shape), 0, 255).astype(np.uint8)
    x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
    noisy[y0:y0 + h // 3, x0:x0 + w // 3] = rng.integers(0, 256, size=3)
    out = io.BytesIO()
    Image.fromarray(noisy).save(out, format=fmt, quality=90) if fmt == "JPEG" else \
        Image.fromarray(noisy).save(out, format=fmt)
    return out.getvalue()


def write_web_shards(folder: str, shards: int, per_shard: int, *, seed: int = 0, stats: bool = True,
                     key_offset: int = 0, formats: Sequence[str] = ("jpg",), with_json: bool = True,
                     sizes: Optional[tuple] = None) -> List[str]:
    """img2dataset-layout tars written with webdataset's TarWriter: KEY.<fmt> + KEY.txt (+ KEY.json),
    KEY a 9-digit string, and NNNNN_stats.json beside each tar when `stats`. Returns the tar paths.
    Captions are 'web caption KEY'."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    pil = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
    paths = []
    for s in range(shards):
        path = os.path.join(folder, f"{s:05d}.tar")
        with wds.TarWriter(path) as sink:
            for i in range(per_shard):
                key = f"{key_offset + s * 10000 + i:09d}"
                fmt = formats[i % len(formats)]
                sample = {"__key__": key, fmt: jpeg_bytes(rng, pil[fmt], sizes), "txt": f"web caption {key}"}
                if with_json:
                    sample["json"] = json.dumps({"key": key, "caption": sample["txt"], "status": "success",
                                                 "url": f"http://example.invalid/{key}.jpg"}).encode()
                sink.write(sample)
        if stats:
            with open(os.path.join(folder, f"{s:05d}_stats.json"), "w") as f:
                json.dump({"count": per_shard, "successes": per_shard, "failed_to_download": 0,
                           "failed_to_resize": 0}, f)
        paths.append(path)
    return paths


if __name__ == "__main__":  # python tests/http_shards.py ROOT PORT_FILE
    root, port_file = sys.argv[1], sys.argv[2]
    server = ShardServer(root)
    tmp = port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(server.port))
    os.replace(tmp, port_file)
    server.httpd.serve_forever()
