"""A stand-in HTTP(S) server for a test: served from a thread on a free loopback port, always stopped."""

from __future__ import annotations

import contextlib
import http.server
import threading
from typing import Iterator, TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def serving(server: T) -> Iterator[T]:
    """`server.httpd` (an http.server bound to port 0) answers while the block runs."""
    httpd: http.server.HTTPServer = getattr(server, "httpd")
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)
