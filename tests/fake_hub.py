"""A Hugging Face Hub stand-in on loopback: enough of the HTTP API for ``snapshot_download``.

Serves model repos (``"org/name"``) and dataset repos (``"datasets/org/name"``) from local folders and records every request's path and
``Authorization`` header, so tests can check what the client sent.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repos: dict[str, Path]):
        self.repos = repos
        self.requests: list[tuple[str, str, str | None]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body: bool):
                hub.requests.append((self.command, self.path, self.headers.get("Authorization")))
                path = self.path.split("?")[0]
                for key, folder in hub.repos.items():
                    kind, repo = (
                        key.split("/", 1) if key.startswith("datasets/") else ("models", key)
                    )
                    files = sorted(
                        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
                    )
                    if path.startswith(f"/api/{kind}/{repo}/tree/"):
                        tree = [
                            {
                                "type": "file",
                                "path": f,
                                "size": (folder / f).stat().st_size,
                                "oid": hashlib.sha1((folder / f).read_bytes()).hexdigest(),
                            }
                            for f in files
                        ]
                        return self._send(json.dumps(tree).encode(), "application/json", body)
                    if path.startswith(f"/api/{kind}/{repo}"):
                        info = {
                            "id": repo,
                            "sha": COMMIT,
                            "siblings": [{"rfilename": f} for f in files],
                        }
                        return self._send(json.dumps(info).encode(), "application/json", body)
                    prefix = (
                        f"/{repo}/resolve/" if kind == "models" else f"/datasets/{repo}/resolve/"
                    )
                    if path.startswith(prefix):
                        name = path[len(prefix) :].split("/", 1)[1]
                        file = folder / name
                        if file.is_file():
                            data = file.read_bytes()
                            return self._send(
                                data,
                                "application/octet-stream",
                                body,
                                etag=hashlib.sha256(data).hexdigest(),
                            )
                self.send_response(404)
                self.send_header("X-Error-Code", "RepoNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _send(self, data: bytes, ctype: str, body: bool, etag: str | None = None):
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("X-Repo-Commit", COMMIT)
                if etag:
                    self.send_header("ETag", f'"{etag}"')
                self.end_headers()
                if body:
                    self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def env(self, home: Path, token: str) -> dict[str, str]:
        """The environment of a child process that talks to this hub (huggingface_hub reads
        its endpoint at import): ``token`` as HF_TOKEN, its cache under ``home``, online."""
        env = os.environ | {
            "HF_ENDPOINT": self.url,
            "HF_TOKEN": token,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HOME": str(home),
        }
        env.pop("HF_HUB_OFFLINE", None)
        return env

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
