"""A small static file server that counts its requests: for tests and ``tools.bench_loader --source http``.

    with ShardServer(folder) as server:   # http://127.0.0.1:<port>/ serves ``folder``
        ... server.url ..., server.requests["shard-000000.tar"], server.stop()

``die_after`` makes it stop (close its socket, so clients get "connection refused") once it has served that
many ``.tar`` files: a server killed mid-epoch, at a reproducible point.
"""

from __future__ import annotations

import functools
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class ShardServer:
    def __init__(self, root: str | Path, port: int = 0, die_after: int | None = None):
        self.root, self.die_after = Path(root), die_after
        self.requests: Counter[str] = Counter()  # file name -> GET requests
        self.lock = threading.Lock()
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                name = self.path.lstrip("/").split("?")[0]
                with server.lock:
                    served = sum(n for k, n in server.requests.items() if k.endswith(".tar"))
                    dead = server.die_after is not None and served >= server.die_after
                    if not dead:
                        server.requests[name] += 1
                if dead:  # a request that raced the shutdown gets no reply, as from a dying server
                    self.close_connection = True
                    return
                super().do_GET()
                if server.die_after is not None and served + name.endswith(".tar") >= server.die_after:
                    threading.Thread(target=server.stop, daemon=True).start()

            def log_message(self, *args):  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Handler, directory=str(self.root)))
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def tar_requests(self) -> Counter[str]:
        with self.lock:
            return Counter({k: n for k, n in self.requests.items() if k.endswith(".tar")})

    def __enter__(self) -> ShardServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
