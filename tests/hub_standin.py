"""A local stand-in of the Hugging Face Hub HTTP API, on loopback, for the REAL huggingface_hub client.

Point the client at it with ``HF_ENDPOINT`` (or ``endpoint=``) and ``HF_HUB_DISABLE_XET`` (the
stand-in speaks the LFS "basic" transfer, not Xet). It implements exactly the endpoints that
``create_repo``, ``create_branch``, ``upload_folder``/``create_commit`` and
``snapshot_download``/``hf_hub_download`` of huggingface_hub 2.x call (read from its source):

====================================================  =================================================
``GET  /api/whoami-v2``                               who the token belongs to
``POST /api/repos/create``                            create a repo (409 if it exists)
``POST /api/validate-yaml``                           README metadata check (always fine)
``GET  /api/models/{repo}[/revision/{rev}]``          model info: sha, private, siblings
``GET  /api/models/{repo}/tree/{rev}[/{path}]``       recursive listing (files with lfs info)
``POST /api/models/{repo}/paths-info/{rev}``          the same entries for given paths (form data)
``POST /api/models/{repo}/preupload/{rev}``           upload mode per file + oid of the remote copy
``POST /api/models/{repo}/branch/{branch}``           create a branch (409 if it exists)
``POST /{repo}.git/info/lfs/objects/batch``           LFS batch: upload actions for missing objects
``PUT  /lfs-upload/{repo}/{oid}``                     LFS object upload (sha256 checked)
``POST /lfs-verify/{repo}/{oid}``                     LFS verify
``POST /api/models/{repo}/commit/{rev}``              ndjson commit (files, lfsFiles, deletions; PRs)
``HEAD|GET /{repo}/resolve/{rev}/{path}``             file download with X-Repo-Commit / ETag headers
====================================================  =================================================

Auth: ``tokens`` maps token -> user. A request with an unknown token gets 401 ("Invalid credentials
in Authorization header"); a write without a token gets 401; a write to a namespace that is not the
user's gets 403; a private repo is invisible (404 RepoNotFound) to everyone but its owner.

Fault injection: :meth:`HubStandIn.fail` makes the next matching request(s) answer a given status.
Every request is logged in :attr:`HubStandIn.requests` as ``(method, path)`` so tests can assert,
for example, that a re-run uploaded nothing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".npz", ".model")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Blob:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def oid(self) -> str:
        """What preupload reports as the remote oid (sha256 for LFS files, git sha1 otherwise)."""
        return self.sha256 if self.lfs else git_blob_sha1(self.data)


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, Blob]


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content
    prs: int = 0

    def resolve(self, rev: str) -> Commit | None:
        if rev in self.refs:
            return self.commits[self.refs[rev]]
        for oid, commit in self.commits.items():
            if oid == rev or (len(rev) >= 7 and oid.startswith(rev)):
                return commit
        return None


@dataclass
class Fault:
    method: str
    pattern: re.Pattern[str]
    status: int
    times: int


class HubStandIn:
    """The server; use as a context manager or call :meth:`start` / :meth:`stop`."""

    def __init__(self, tokens: dict[str, str] | None = None) -> None:
        self.tokens = dict(tokens or {"hf_writer": "alice"})
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.faults: list[Fault] = []
        self.lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubStandIn:
        standin = self

        class Handler(_Handler):
            hub = standin

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> HubStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test helpers -------------------------------------------------------------------------
    def fail(self, method: str, path_regex: str, status: int, times: int = 1) -> None:
        """Answer the next ``times`` requests ``method path~path_regex`` with ``status``."""
        with self.lock:
            self.faults.append(Fault(method.upper(), re.compile(path_regex), status, times))

    def take_fault(self, method: str, path: str) -> int | None:
        with self.lock:
            for fault in self.faults:
                if fault.times > 0 and fault.method == method and fault.pattern.search(path):
                    fault.times -= 1
                    return fault.status
        return None

    def head_files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        """Files of ``repo_id`` at ``rev`` (content), as stored."""
        commit = self.repos[repo_id].resolve(rev)
        assert commit is not None
        return {path: blob.data for path, blob in commit.files.items()}

    def count(self, method: str, path_regex: str) -> int:
        pattern = re.compile(path_regex)
        return sum(1 for m, p in self.requests if m == method and pattern.search(p))


class _Reply(Exception):
    def __init__(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or {}


def _error(status: int, message: str, code: str | None = None) -> _Reply:
    headers = {"X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    return _Reply(status, {"error": message}, headers)


REPO = r"(?P<repo>[^/]+/[^/]+)"


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the default logging
        pass

    # -- plumbing -----------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None, head: bool = False) -> None:
        if isinstance(body, bytes):
            payload, ctype = body, "application/octet-stream"
        elif body is None:
            payload, ctype = b"", "application/json"
        else:
            payload, ctype = json.dumps(body).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(payload)

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        user = self.hub.tokens.get(token)
        if user is None:
            raise _error(401, "Invalid credentials in Authorization header")
        return user

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        path, query = split.path, parse_qs(split.query)
        with self.hub.lock:
            self.hub.requests.append((method, path))
        body = self._body() if method in ("POST", "PUT") else b""
        try:
            status = self.hub.take_fault(method, path)
            if status is not None:
                raise _error(status, f"injected failure {status}")
            reply = self._route(method, path, query, body)
        except _Reply as r:
            reply = r
        self._send(reply.status, reply.body, reply.headers, head=method == "HEAD")

    do_GET = lambda self: self._dispatch("GET")  # noqa: E731
    do_HEAD = lambda self: self._dispatch("HEAD")  # noqa: E731
    do_POST = lambda self: self._dispatch("POST")  # noqa: E731
    do_PUT = lambda self: self._dispatch("PUT")  # noqa: E731

    def _route(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> _Reply:
        routes: list[tuple[str, str, Any]] = [
            ("GET", r"/api/whoami-v2", self.whoami),
            ("POST", r"/api/repos/create", self.create_repo),
            ("POST", r"/api/validate-yaml", lambda **_: _Reply(200, {"errors": [], "warnings": []})),
            ("GET", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", self.tree),
            ("POST", rf"/api/models/{REPO}/paths-info/(?P<rev>[^/]+)", self.paths_info),
            ("GET", rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?", self.model_info),
            ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", self.preupload),
            ("POST", rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)", self.create_branch),
            ("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", self.commit),
            ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", self.lfs_batch),
            ("PUT", rf"/lfs-upload/{REPO}/(?P<oid>[0-9a-f]{{64}})", self.lfs_upload),
            ("POST", rf"/lfs-verify/{REPO}/(?P<oid>[0-9a-f]{{64}})", self.lfs_verify),
            ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self.resolve),
            ("HEAD", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self.resolve),
        ]
        for route_method, pattern, handler in routes:
            m = re.fullmatch(pattern, path)
            if route_method == method and m:
                args = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
                return handler(query=query, body=body, **args)
        raise _error(404, f"no route for {method} {path}")

    # -- helpers ------------------------------------------------------------------------------
    def _repo(self, repo: str, *, write: bool = False) -> Repo:
        user = self._user()
        if write and user is None:
            raise _error(401, "You must be authenticated to write")
        r = self.hub.repos.get(repo)
        if r is None or (r.private and user != r.owner):
            raise _error(404, "Repository not found", "RepoNotFound")
        if write and user != r.owner:
            raise _error(403, f"You don't have the rights to write to {repo}")
        return r

    def _commit(self, repo: Repo, rev: str) -> Commit:
        c = repo.resolve(rev)
        if c is None:
            raise _error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return c

    # -- endpoints ----------------------------------------------------------------------------
    def whoami(self, **_: Any) -> _Reply:
        user = self._user()
        if user is None:
            raise _error(401, "Invalid credentials in Authorization header")
        return _Reply(200, {"type": "user", "name": user, "orgs": [], "auth": {"accessToken": {"role": "write"}}})

    def create_repo(self, body: bytes, **_: Any) -> _Reply:
        user = self._user()
        if user is None:
            raise _error(401, "You must be authenticated to create a repo")
        payload = json.loads(body)
        if payload.get("type", "model") != "model":
            raise _error(400, "the stand-in only hosts model repos")
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        if namespace != user:
            raise _error(403, f"You don't have the rights to create a repo under {namespace}")
        with self.hub.lock:
            if repo_id in self.hub.repos:  # the Hub also answers the url on 409
                raise _Reply(
                    409,
                    {"error": "You already created this model repo", "url": f"{self.hub.endpoint}/{repo_id}"},
                    {"X-Error-Message": "You already created this model repo"},
                )
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            repo = Repo(repo_id, user, private)
            initial = Commit(_new_oid(repo_id, "init"), None, "initial commit", {
                ".gitattributes": Blob(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", False)
            })
            repo.commits[initial.oid] = initial
            repo.refs["main"] = initial.oid
            self.hub.repos[repo_id] = repo
        return _Reply(200, {"url": f"{self.hub.endpoint}/{repo_id}", "name": repo_id})

    def model_info(self, repo: str, rev: str = "main", **_: Any) -> _Reply:
        r = self._repo(repo)
        c = self._commit(r, rev)
        return _Reply(200, {
            "id": repo,
            "modelId": repo,
            "sha": c.oid,
            "private": r.private,
            "author": r.owner,
            "siblings": [{"rfilename": p} for p in sorted(c.files)],
        })

    def tree(self, repo: str, rev: str, query: dict[str, list[str]], sub: str = "", **_: Any) -> _Reply:
        r = self._repo(repo)
        c = self._commit(r, rev)
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        entries: list[dict[str, Any]] = []
        folders: set[str] = set()
        for p in sorted(c.files):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/", 1)[0])
                continue
            if recursive:
                parts = rest.split("/")[:-1]
                for i in range(len(parts)):
                    folders.add(prefix + "/".join(parts[: i + 1]))
            entries.append(_file_entry(p, c.files[p]))
        entries += [_folder_entry(f) for f in sorted(folders)]
        return _Reply(200, entries)

    def paths_info(self, repo: str, rev: str, body: bytes, **_: Any) -> _Reply:
        r = self._repo(repo)
        c = self._commit(r, rev)
        entries: list[dict[str, Any]] = []
        for p in parse_qs(body.decode()).get("paths", []):
            if p in c.files:
                entries.append(_file_entry(p, c.files[p]))
            elif any(f.startswith(p.rstrip("/") + "/") for f in c.files):
                entries.append(_folder_entry(p))
        return _Reply(200, entries)

    def preupload(self, repo: str, rev: str, body: bytes, **_: Any) -> _Reply:
        r = self._repo(repo, write=True)
        c = r.resolve(rev)
        files = []
        for f in json.loads(body)["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["path"].endswith(LFS_SUFFIXES) or b"\x00" in sample or f["size"] > 10 * 1024 * 1024
            remote = c.files.get(f["path"]) if c is not None else None
            files.append({
                "path": f["path"],
                "uploadMode": "lfs" if lfs else "regular",
                "shouldIgnore": False,
                "oid": remote.oid if remote is not None and remote.lfs == lfs else None,
            })
        return _Reply(200, {"files": files, "commitOid": c.oid if c else None})

    def create_branch(self, repo: str, branch: str, body: bytes, **_: Any) -> _Reply:
        r = self._repo(repo, write=True)
        payload = json.loads(body or b"{}")
        with self.hub.lock:
            if branch in r.refs:
                raise _error(409, f"Reference already exists: {branch}")
            r.refs[branch] = self._commit(r, payload.get("startingPoint", "main")).oid
        return _Reply(200, {})

    def lfs_batch(self, repo: str, body: bytes, **_: Any) -> _Reply:
        r = self._repo(repo, write=True)
        payload = json.loads(body)
        objects = []
        for obj in payload["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in r.lfs:
                base = self.hub.endpoint
                entry["actions"] = {
                    "upload": {"href": f"{base}/lfs-upload/{repo}/{obj['oid']}"},
                    "verify": {"href": f"{base}/lfs-verify/{repo}/{obj['oid']}"},
                }
            objects.append(entry)
        return _Reply(200, {"transfer": "basic", "objects": objects})

    def lfs_upload(self, repo: str, oid: str, body: bytes, **_: Any) -> _Reply:
        r = self.hub.repos.get(repo)
        if r is None:
            raise _error(404, "Repository not found", "RepoNotFound")
        if hashlib.sha256(body).hexdigest() != oid:
            raise _error(400, "uploaded content does not match its sha256")
        with self.hub.lock:
            r.lfs[oid] = body
        return _Reply(200, {})

    def lfs_verify(self, repo: str, oid: str, body: bytes, **_: Any) -> _Reply:
        r = self._repo(repo, write=True)
        payload = json.loads(body)
        if oid not in r.lfs or len(r.lfs[oid]) != payload["size"]:
            raise _error(422, f"LFS object {oid} is missing or has the wrong size")
        return _Reply(200, {})

    def commit(self, repo: str, rev: str, body: bytes, query: dict[str, list[str]], **_: Any) -> _Reply:
        r = self._repo(repo, write=True)
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        with self.hub.lock:
            base = self._commit(r, rev)
            files = dict(base.files)
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "file":
                    files[value["path"]] = Blob(base64.b64decode(value["content"]), False)
                elif key == "lfsFile":
                    if value["oid"] not in r.lfs:
                        raise _error(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                    files[value["path"]] = Blob(r.lfs[value["oid"]], True)
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise _error(404, f"{value['path']} does not exist", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: b for p, b in files.items() if not p.startswith(prefix)}
            oid = _new_oid(repo, f"{base.oid}{header['summary']}{len(r.commits)}")
            r.commits[oid] = Commit(oid, base.oid, header["summary"], files)
            pr_url = None
            if query.get("create_pr", ["0"])[0] == "1":
                r.prs += 1
                r.refs[f"refs/pr/{r.prs}"] = oid
                pr_url = f"{self.hub.endpoint}/{repo}/discussions/{r.prs}"
            else:
                r.refs[rev] = oid
        return _Reply(200, {
            "success": True,
            "commitOid": oid,
            "commitUrl": f"{self.hub.endpoint}/{repo}/commit/{oid}",
            "pullRequestUrl": pr_url,
        })

    def resolve(self, repo: str, rev: str, file: str, **_: Any) -> _Reply:
        r = self._repo(repo)
        c = self._commit(r, rev)
        blob = c.files.get(file)
        if blob is None:
            raise _Reply(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": c.oid})
        etag = blob.sha256 if blob.lfs else git_blob_sha1(blob.data)
        headers = {"X-Repo-Commit": c.oid, "ETag": f'"{etag}"'}
        if blob.lfs:
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(len(blob.data))
        return _Reply(200, blob.data, headers)


def _file_entry(path: str, blob: Blob) -> dict[str, Any]:
    """A file as the tree and paths-info endpoints describe it (git blob oid; sha256 for LFS)."""
    entry: dict[str, Any] = {"type": "file", "path": path, "size": len(blob.data), "oid": git_blob_sha1(blob.data)}
    if blob.lfs:
        entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": 134}
    return entry


def _folder_entry(path: str) -> dict[str, Any]:
    return {"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()}


def _new_oid(*parts: str) -> str:
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()
