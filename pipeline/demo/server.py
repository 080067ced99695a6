"""A small HTTP file server on 127.0.0.1 that counts what it serves.

The offline demo serves its generated corpora with it so that downloaders (img2dataset,
the speech recipes) fetch them over real HTTP; tests use the hit counts to prove that a
re-run downloads nothing.
"""
from __future__ import annotations

import threading
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class QuietHandler(SimpleHTTPRequestHandler):
    """Serves files from the server's root; counts requests; logs nothing."""

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass

    def send_head(self):
        with self.server.lock:
            self.server.hits[self.path.split("?", 1)[0]] += 1
        return super().send_head()


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
