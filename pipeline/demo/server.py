"""A small HTTP file server on 127.0.0.1 that counts what it serves.

The offline demo serves its generated corpora with it so that downloaders (img2dataset,
the speech recipes) fetch them over real HTTP; tests use the hit counts to prove that a
re-run downloads nothing. Single byte ranges (`Range: bytes=N-` or `bytes=N-M`) are honoured so
that interrupted archive downloads can resume.
"""
from __future__ import annotations

import os
import re
import threading
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class QuietHandler(SimpleHTTPRequestHandler):
    """Serves files from the server's root; counts requests; logs nothing."""

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass

    _range_length: int | None = None   # bytes left to send for a 206; None: send to the end

    def send_head(self):
        with self.server.lock:
            self.server.hits[self.path.split("?", 1)[0]] += 1
        self._range_length = None
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "").strip())
        path = self.translate_path(self.path)
        if not match or not os.path.isfile(path) or (match[2] and int(match[2]) < int(match[1])):
            return super().send_head()   # no single valid range (RFC 9110: ignore it): the whole file
        size = os.path.getsize(path)
        start, end = int(match[1]), min(int(match[2] or size - 1), size - 1)
        if start >= size:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        f = open(path, "rb")
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self._range_length = end - start + 1
        return f

    def end_headers(self):
        self.send_header("Accept-Ranges", "bytes")   # RFC 9110 allows it on any response
        super().end_headers()

    def copyfile(self, source, outputfile):
        if self._range_length is None:
            return super().copyfile(source, outputfile)
        left = self._range_length   # in pieces: a range may be most of a large archive
        while left > 0 and (chunk := source.read(min(left, 1 << 16))):
            outputfile.write(chunk)
            left -= len(chunk)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024   # the default 5 drops connects from many downloader threads (1 s SYN retry)


class LocalServer:
    """Context manager: `with LocalServer(folder) as srv: srv.url("a.jpg")`."""

    def __init__(self, root: str | Path, handler: type[SimpleHTTPRequestHandler] = QuietHandler):
        self.root = Path(root)
        self.handler = handler
        self._httpd: _Server | None = None

    def __enter__(self) -> "LocalServer":
        self._httpd = _Server(("127.0.0.1", 0), partial(self.handler, directory=str(self.root)))
        self._httpd.hits = Counter()
        self._httpd.lock = threading.Lock()
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def url(self, path: str) -> str:
        return self.base_url + path.lstrip("/")

    @property
    def hits(self) -> Counter:
        """Requests per path so far."""
        return self._httpd.hits
