"""Real-registry test harness: Debian's docker-registry in four variants, a token server, a
fault-injecting counting proxy, and pytest fixtures for all of them.

Import into any test module or conftest (``tests/`` is on ``sys.path``)::

    from registry import registry_plain, fault_proxy  # noqa: F401  (pytest fixtures)
    from registry import RegistryServer, FaultProxy, Fault, push_image

Pieces:

- :class:`RegistryServer`: ``docker-registry serve`` (distribution 2.8) on 127.0.0.1 with a
  config written by the test: storage in a tmp dir, a free port, waited for until ``/v2/``
  answers. ``kind`` is ``plain`` (HTTP), ``basic`` (htpasswd), ``token`` (bearer tokens from
  a :class:`TokenServer`) or ``tls`` (HTTPS, certificate from a CA made here).
  :meth:`RegistryServer.client` gives a :class:`~nydus.registry.RegistryClient` set up for
  it; :meth:`RegistryServer.blob_path` is the blob's file in the registry storage (to corrupt).
- :class:`TokenServer`: an in-process docker token server (POST form and GET, RS256 JWTs
  with an ``x5c`` certificate the registry trusts), with counters and knobs.
- :class:`FaultProxy`: an HTTP server that forwards to a registry and counts requests and
  bytes served per blob digest; :class:`Fault` rules make it fail on purpose (statuses,
  Retry-After, resets mid-body, short/long bodies, Range ignored, redirect loops, redirects to
  an "object store" on another host name, delays) and it can serve TLS with any certificate.
- Fixtures: ``registry_plain``, ``registry_basic``, ``registry_token``, ``registry_tls``
  (session-scoped), ``registry_any`` (parametrized over the four), ``fault_proxy``
  (per test, in front of ``registry_plain``), ``fault_proxy_factory`` (per test, in front of
  any of them), ``test_ca``.
- :func:`push_image`: push a small image (config + layers + manifest) with our client;
  :func:`write_oci_layout`: an OCI image layout directory (for ``skopeo copy oci:...``).

Everything listens on 127.0.0.1 only and stops at the end of the session or test.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import http.client
import http.server
import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from nydus.format import oci
from nydus.registry import RegistryClient

REGISTRY_BIN = "docker-registry"
USER, PASSWORD = "nydus", "s3cret-pass"
SERVICE = "nydus-test-registry"
ISSUER = "nydus-test-issuer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def basic_auth(user: str = USER, password: str = PASSWORD) -> str:
    """base64 ``user:password`` as nydusd's ``auth`` key wants it."""
    return base64.b64encode(f"{user}:{password}".encode()).decode()


# --- certificates -------------------------------------------------------------------------


@dataclass
class CertPair:
    cert_pem: Path
    key_pem: Path
    cert: x509.Certificate
    key: rsa.RSAPrivateKey


def _write_pair(directory: Path, name: str, cert: x509.Certificate, key: rsa.RSAPrivateKey):
    cp, kp = directory / f"{name}.crt", directory / f"{name}.key"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return CertPair(cp, kp, cert, key)


def make_ca(directory: Path, name: str = "nydus-test-ca") -> CertPair:
    """A self-signed CA (RSA 2048, valid a day either side of now)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return _write_pair(directory, name, cert, key)


def issue_cert(ca: CertPair, directory: Path, name: str, hosts: list[str]) -> CertPair:
    """A server certificate for ``hosts`` (DNS names or IPs) signed by ``ca``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return _write_pair(directory, name, cert, key)


# --- token server -------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # resets and TLS failures are expected in these tests


class TokenServer:
    """A docker token server (``/token``) in a thread.

    Knobs (attributes, change them between requests): ``users`` {name: password},
    ``refresh_tokens`` {token: user}, ``anonymous_pull``, ``post_enabled`` (False answers POST
    with 404, to exercise the GET fallback), ``expires_in`` (what the answer says) and
    ``jwt_ttl`` (what the JWT's ``exp`` says). Counters: ``posts``, ``gets``, ``issued``.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.signing = make_ca(directory, "token-signer")  # self-signed: it is its own root
        self.users: dict[str, str] = {USER: PASSWORD}
        self.refresh_tokens: dict[str, str] = {}
        self.anonymous_pull = False
        self.post_enabled = True
        self.expires_in: int | None = 300
        self.jwt_ttl = 300
        self.posts = 0
        self.gets = 0
        self.issued = 0
        self.seen_scopes: list[list[str]] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                owner._handle(self, "GET")

            def do_POST(self) -> None:
                owner._handle(self, "POST")

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.realm = f"http://127.0.0.1:{self.port}/token"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()

    @property
    def rootcertbundle(self) -> Path:
        return self.signing.cert_pem

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _reply(self, h: http.server.BaseHTTPRequestHandler, status: int, doc: Any) -> None:
        body = json.dumps(doc).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _handle(self, h: http.server.BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(h.path)
        if url.path != "/token":
            self._reply(h, 404, {"error": "not found"})
            return
        user: str | None = None
        offline = False
        if method == "POST":
            with self._lock:
                self.posts += 1
            length = int(h.headers.get("Content-Length") or 0)
            form = parse_qs(h.rfile.read(length).decode())
            if not self.post_enabled:
                self._reply(h, 404, {"error": "POST not supported"})
                return
            grant = (form.get("grant_type") or [""])[0]
            if grant == "password":
                name = (form.get("username") or [""])[0]
                if self.users.get(name) != (form.get("password") or [None])[0]:
                    self._reply(h, 401, {"error": "invalid_grant"})
                    return
                user = name
            elif grant == "refresh_token":
                user = self.refresh_tokens.get((form.get("refresh_token") or [""])[0])
                if user is None:
                    self._reply(h, 401, {"error": "invalid_grant"})
                    return
            else:
                self._reply(h, 400, {"error": "unsupported_grant_type"})
                return
            scopes = " ".join(form.get("scope") or []).split()
            service = (form.get("service") or [""])[0]
            offline = (form.get("access_type") or [""])[0] == "offline"
        else:
            with self._lock:
                self.gets += 1
            q = parse_qs(url.query)
            scopes = [s for v in q.get("scope", []) for s in v.split()]
            service = (q.get("service") or [""])[0]
            authz = h.headers.get("Authorization") or ""
            if authz.startswith("Basic "):
                raw = base64.b64decode(authz[6:]).decode()
                name, _, pw = raw.partition(":")
                if self.users.get(name) != pw:
                    self._reply(h, 401, {"errors": [{"code": "UNAUTHORIZED"}]})
                    return
                user = name
        if user is None and not self.anonymous_pull and scopes:
            self._reply(h, 401, {"errors": [{"code": "UNAUTHORIZED", "message": "login"}]})
            return
        access = []
        for s in scopes:
            parts = s.split(":")
            if len(parts) < 3 or parts[0] != "repository":
                continue
            name, actions = ":".join(parts[1:-1]), parts[-1].split(",")
            granted = actions if user else [a for a in actions if a == "pull"]
            access.append({"type": "repository", "name": name, "actions": granted})
        token = self.sign(user or "", service, access)
        with self._lock:
            self.issued += 1
            self.seen_scopes.append(scopes)
        doc: dict[str, Any] = {
            "token": token,
            "access_token": token,
            "issued_at": datetime.datetime.now(datetime.UTC).isoformat(),
        }
        if self.expires_in is not None:
            doc["expires_in"] = self.expires_in
        if method == "POST" and offline and user:
            rt = secrets.token_hex(8)
            self.refresh_tokens[rt] = user
            doc["refresh_token"] = rt
        self._reply(h, 200, doc)

    def sign(self, subject: str, audience: str, access: list[dict[str, Any]]) -> str:
        now = int(time.time())
        der = self.signing.cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        claims = {
            "iss": ISSUER,
            "sub": subject,
            "aud": audience,
            "exp": now + self.jwt_ttl,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        sig = self.signing.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(sig)


# --- the registry -------------------------------------------------------------------------


class RegistryServer:
    """One ``docker-registry`` process. Start with :meth:`start`, stop with :meth:`stop`."""

    def __init__(self, kind: str, directory: Path, *, ca: CertPair | None = None) -> None:
        if kind not in ("plain", "basic", "token", "tls"):
            raise ValueError(kind)
        self.kind = kind
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.storage = self.dir / "storage"
        self.ca = ca
        self.token_server: TokenServer | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log_path = self.dir / "registry.log"

    @property
    def scheme(self) -> str:
        return "https" if self.kind == "tls" else "http"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`RegistryClient` that fit this variant."""
        kw: dict[str, Any] = {"scheme": self.scheme, "docker_config": None, "retry_backoff": 0.01}
        if self.kind in ("basic", "token"):
            kw["auth"] = basic_auth()
        if self.kind == "tls":
            assert self.ca is not None
            kw["ca_cert_files"] = [str(self.ca.cert_pem)]
        return kw

    def client(self, **overrides: Any) -> RegistryClient:
        return RegistryClient(self.host, **{**self.client_kwargs(), **overrides})

    def skopeo_args(self) -> list[str]:
        """skopeo flags for this variant (``--tls-verify=false`` or a cert dir, creds)."""
        args = ["--tls-verify=false"]
        if self.kind in ("basic", "token"):
            args.append(f"--creds={USER}:{PASSWORD}")
        return args

    def blob_path(self, digest: str) -> Path:
        """The file that holds ``digest`` in the registry's filesystem storage."""
        algo, hexd = digest.split(":", 1)
        return self.storage / "docker/registry/v2/blobs" / algo / hexd[:2] / hexd / "data"

    def _config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "version": "0.1",
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": f"127.0.0.1:{self.port}", "secret": "nydus-test-secret"},
        }
        if self.kind == "basic":
            htp = self.dir / "htpasswd"
            out = subprocess.run(
                ["htpasswd", "-Bbn", USER, PASSWORD], check=True, capture_output=True, text=True
            ).stdout
            htp.write_text(out)
            cfg["auth"] = {"htpasswd": {"realm": "nydus-test", "path": str(htp)}}
        elif self.kind == "token":
            if self.token_server is None:
                self.token_server = TokenServer(self.dir)
            cfg["auth"] = {
                "token": {
                    "realm": self.token_server.realm,
                    "service": SERVICE,
                    "issuer": ISSUER,
                    "rootcertbundle": str(self.token_server.rootcertbundle),
                }
            }
        elif self.kind == "tls":
            if self.ca is None:
                self.ca = make_ca(self.dir)
            server = issue_cert(self.ca, self.dir, "registry", ["127.0.0.1", "localhost"])
            cfg["http"]["tls"] = {"certificate": str(server.cert_pem), "key": str(server.key_pem)}
        return cfg

    def start(self, timeout: float = 20.0) -> RegistryServer:
        exe = shutil.which(REGISTRY_BIN)
        if exe is None:
            pytest.skip(f"{REGISTRY_BIN} is not installed (scripts/setup.sh installs it)")
        for _ in range(5):
            self.port = free_port()
            cfg_path = self.dir / "config.yml"
            cfg_path.write_text(json.dumps(self._config(), indent=1))  # JSON is YAML
            log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
            self.proc = subprocess.Popen(
                [exe, "serve", str(cfg_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            log.close()
            if self._wait_ready(timeout):
                return self
            self._kill()
        raise RuntimeError(f"docker-registry did not start; log:\n{self.log_text()}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        ctx = ssl.create_default_context()
        if self.ca is not None:
            ctx.load_verify_locations(cafile=str(self.ca.cert_pem))
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                conn: http.client.HTTPConnection
                if self.kind == "tls":
                    conn = http.client.HTTPSConnection(
                        "127.0.0.1", self.port, timeout=2, context=ctx
                    )
                else:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/v2/")
                status = conn.getresponse().status
                conn.close()
                if status in (200, 401):
                    return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def stop(self) -> None:
        self._kill()
        if self.token_server is not None:
            self.token_server.stop()


# --- the fault-injecting, counting proxy --------------------------------------------------


@dataclass
class Fault:
    """One rule of :class:`FaultProxy`: requests matching ``method`` and the ``path`` regex
    get ``action``, ``times`` times (None = always).

    Actions: ``status`` (answer ``status`` with ``headers``/``body``), ``reset`` (forward, send
    ``after`` body bytes, then reset the connection), ``short`` (declare the full length, send
    ``after`` bytes, close), ``long`` (append ``extra`` bytes to the body), ``ignore_range``
    (drop the Range header: upstream answers 200 with the whole blob), ``bad_range`` (answer
    206 with a Content-Range shifted by one), ``loop`` (redirect in a circle), ``redirect``
    (blob GETs 307 to ``/objects/...`` on ``localhost``: a different host name),
    ``delay`` (sleep ``seconds`` before forwarding), ``strip_query`` (forward without the
    query string: a mount request becomes a plain upload start), ``stall`` (send ``after``
    body bytes, stop for ``seconds``, then send the rest), ``shift_body`` (a ranged GET is
    answered 206 with the headers of the range asked for, Content-Range included, but with
    the bytes one further into the blob: wrong data behind right headers), ``flip`` (one byte
    of the body, at ``after`` modulo its length, is inverted; headers unchanged). It also
    works as a forward proxy (absolute-URI requests), for the ``proxy`` setting.

    ``probability`` below 1 makes a matching request take the rule only that often (a
    ``random.Random(seed)`` of the proxy decides), so ``times=None, probability=0.3`` fails
    about 30 % of the requests.
    """

    action: str
    path: str = r".*"
    method: str | None = None
    times: int | None = 1
    status: int = 500
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    after: int = 0
    extra: bytes = b"EXTRA-BYTES"
    seconds: float = 0.0
    probability: float = 1.0

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        if self.method is not None and self.method != method:
            return False
        return re.search(self.path, path) is not None


@dataclass
class ProxyRecord:
    method: str
    path: str
    range: str | None
    status: int
    body_bytes: int
    authorization: str | None


_BLOB_RE = re.compile(r"/(?:v2/.+/blobs|objects)/(sha256:[0-9a-f]{64})")


class FaultProxy:
    """HTTP(S) front for a registry: forwards, counts, and fails on purpose (see :class:`Fault`).

    ``host`` is ``127.0.0.1:port``; with ``tls`` (a :class:`CertPair`) it speaks HTTPS.
    ``records`` lists every request answered; :meth:`blob_bytes` sums the body bytes sent for
    one digest (through ``/v2/.../blobs/`` and the ``/objects/`` redirect target).
    """

    def __init__(
        self, upstream: RegistryServer, *, tls: CertPair | None = None, seed: int = 0
    ) -> None:
        self.upstream = upstream
        self.faults: list[Fault] = []
        self._rng = random.Random(seed)
        self.records: list[ProxyRecord] = []
        self.received = 0  # request body bytes forwarded (uploads the registry receives)
        self._lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                owner._handle(self)

            do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls.cert_pem), str(tls.key_pem))
            self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def client(self, **overrides: Any) -> RegistryClient:
        kw = {**self.upstream.client_kwargs(), "scheme": self.scheme, **overrides}
        return RegistryClient(self.host, **kw)

    def add(self, *faults: Fault) -> FaultProxy:
        with self._lock:
            self.faults.extend(faults)
        return self

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.records.clear()
            self.received = 0

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def count(self, method: str | None = None, path: str = r".*") -> int:
        with self._lock:
            return sum(
                1
                for r in self.records
                if (method is None or r.method == method) and re.search(path, r.path)
            )

    def blob_bytes(self, digest: str) -> int:
        """Body bytes of blob data sent for ``digest`` (200/206 answers to GETs of the blob
        and of its redirect target; error bodies do not count)."""
        with self._lock:
            return sum(
                r.body_bytes
                for r in self.records
                if r.method == "GET"
                and r.status in (200, 206)
                and (m := _BLOB_RE.search(r.path))
                and m.group(1) == digest
            )

    # --- request handling ---

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.matches(method, path):
                    if f.probability < 1.0 and self._rng.random() >= f.probability:
                        continue
                    if f.times is not None:
                        f.times -= 1
                    return f
        return None

    def _record(self, h: http.server.BaseHTTPRequestHandler, status: int, n: int) -> None:
        with self._lock:
            self.records.append(
                ProxyRecord(
                    h.command,
                    h.path,
                    h.headers.get("Range"),
                    status,
                    n,
                    h.headers.get("Authorization"),
                )
            )

    def _send(
        self,
        h: http.server.BaseHTTPRequestHandler,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> None:
        # Record before anything goes out: a client may look at the records as soon as it
        # has the answer, and an answer with an empty body is complete with its headers.
        self._record(h, status, 0 if h.command == "HEAD" else len(body))
        h.send_response(status)
        for k, v in headers:
            h.send_header(k, v)
        if not any(k.lower() == "content-length" for k, _ in headers):
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        if h.path.startswith(("http://", "https://")):  # used as a forward proxy
            parts = urlsplit(h.path)
            h.path = parts.path + (f"?{parts.query}" if parts.query else "")
        method, path = h.command, h.path
        length = int(h.headers.get("Content-Length") or 0)
        req_body = h.rfile.read(length) if length else b""
        with self._lock:
            self.received += len(req_body)
        fault = self._take_fault(method, path)
        action = fault.action if fault else ""
        if fault is not None and action == "status":
            self._send(h, fault.status, list(fault.headers.items()), fault.body)
            return
        if fault is not None and action == "delay":
            time.sleep(fault.seconds)
        if fault is not None and action == "loop":
            nxt = "/loop/b" if path.endswith("/loop/a") else "/loop/a"
            self._send(h, 302, [("Location", nxt)], b"")
            return
        if path.startswith("/loop/"):
            nxt = "/loop/b" if path.endswith("/loop/a") else "/loop/a"
            self._send(h, 302, [("Location", nxt)], b"")
            return
        m = _BLOB_RE.search(path)
        if fault is not None and action == "redirect" and m and method in ("GET", "HEAD"):
            self._send(
                h,
                307,
                [
                    (
                        "Location",
                        f"{self.scheme}://localhost:{self.port}/objects/{m.group(1)}"
                        f"?repo={path.split('/blobs/')[0][4:]}",
                    )
                ],
                b"",
            )
            return
        upstream_path = path
        if action == "strip_query":  # e.g. refuse cross-repo mounts: a plain upload starts
            upstream_path = path.split("?", 1)[0]
        if path.startswith("/objects/") and m:
            repo = parse_qs(urlsplit(path).query).get("repo", [""])[0]
            upstream_path = f"/v2/{repo}/blobs/{m.group(1)}"
        headers = {
            k: v
            for k, v in h.headers.items()
            if k.lower() not in ("connection", "keep-alive", "transfer-encoding")
        }
        if path.startswith("/objects/"):
            headers.pop("Authorization", None)
        if action == "ignore_range":
            headers.pop("Range", None)
        asked_range = ""
        if action == "shift_body" and method == "GET":
            rng_key = next((k for k in headers if k.lower() == "range"), None)
            mm = re.match(r"bytes=(\d+)-(\d+)$", headers.get(rng_key, "")) if rng_key else None
            if rng_key and mm:
                a, b = int(mm.group(1)), int(mm.group(2))
                asked_range = f"{a}-{b}"
                headers[rng_key] = f"bytes={a + 1}-{b + 1}"
        conn = self._upstream_conn()
        try:
            conn.request(method, upstream_path, body=req_body, headers=headers)
            up = conn.getresponse()
            out_headers = [
                (k, v)
                for k, v in up.getheaders()
                if k.lower()
                not in ("connection", "keep-alive", "transfer-encoding", "content-length")
            ]
            length = up.getheader("Content-Length")
            if not action and method == "GET" and length is not None:
                # No fault to apply: stream (blobs may be large), counting what goes out.
                self._stream(h, up, out_headers, int(length))
                return
            body = up.read() if method != "HEAD" else b""
            declared = int(length or len(body))
        finally:
            conn.close()
        status = up.status
        if asked_range and status == 206:
            a, b = (int(x) for x in asked_range.split("-"))
            total = re.sub(r"^.*/", "", up.getheader("Content-Range") or "*/*")
            body = body[: b - a + 1]
            out_headers = [(k, v) for k, v in out_headers if k.lower() != "content-range"]
            out_headers.append(("Content-Range", f"bytes {a}-{a + len(body) - 1}/{total}"))
        if action == "flip" and method == "GET" and body and fault is not None:
            at = fault.after % len(body)
            body = body[:at] + bytes([body[at] ^ 0xFF]) + body[at + 1 :]
        if action == "stall" and method == "GET" and fault is not None:
            h.send_response(status)
            for k, v in out_headers:
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            self._record(h, status, len(body))
            try:
                h.wfile.write(body[: fault.after])
                h.wfile.flush()
                time.sleep(fault.seconds)
                h.wfile.write(body[fault.after :])
            except OSError:  # the client gave up during the stall
                h.close_connection = True
            return
        if action == "bad_range" and status == 206:
            cr = up.getheader("Content-Range") or ""
            mm = re.match(r"bytes (\d+)-(\d+)/(\d+)", cr)
            if mm:
                a, b, t = (int(x) for x in mm.groups())
                out_headers = [(k, v) for k, v in out_headers if k.lower() != "content-range"]
                out_headers.append(("Content-Range", f"bytes {a + 1}-{b + 1}/{t}"))
        if action in ("reset", "short") and method == "GET":
            h.send_response(status)
            for k, v in out_headers:
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            self._record(h, status, min(len(body), fault.after if fault else 0))
            h.wfile.write(body[: fault.after if fault else 0])
            h.wfile.flush()
            if action == "reset":
                h.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            h.close_connection = True
            return
        if action == "long" and method == "GET" and fault is not None:
            h.send_response(status)
            for k, v in out_headers:
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            self._record(h, status, len(body))
            h.wfile.write(body + fault.extra)
            h.close_connection = True
            return
        if method == "HEAD":
            out_headers.append(("Content-Length", str(declared)))
        self._send(h, status, out_headers, body)

    def _stream(
        self,
        h: http.server.BaseHTTPRequestHandler,
        up: http.client.HTTPResponse,
        headers: list[tuple[str, str]],
        length: int,
    ) -> None:
        with self._lock:  # recorded up front (see _send), corrected to what was really sent
            rec = ProxyRecord(
                h.command,
                h.path,
                h.headers.get("Range"),
                up.status,
                length,
                h.headers.get("Authorization"),
            )
            self.records.append(rec)
        h.send_response(up.status)
        for k, v in headers:
            h.send_header(k, v)
        h.send_header("Content-Length", str(length))
        h.end_headers()
        sent = 0
        try:
            while piece := up.read(1 << 20):
                h.wfile.write(piece)
                sent += len(piece)
        except OSError:
            h.close_connection = True
        finally:
            with self._lock:
                rec.body_bytes = sent
            if sent != length:
                h.close_connection = True

    def _upstream_conn(self) -> http.client.HTTPConnection:
        up = self.upstream
        if up.kind == "tls":
            ctx = ssl.create_default_context(cafile=str(up.ca.cert_pem) if up.ca else None)
            return http.client.HTTPSConnection("127.0.0.1", up.port, timeout=30, context=ctx)
        return http.client.HTTPConnection("127.0.0.1", up.port, timeout=30)


# --- images -------------------------------------------------------------------------------


def image_config(diff_ids: list[str]) -> bytes:
    doc = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "nydus-py test"} for _ in diff_ids],
    }
    return json.dumps(doc, sort_keys=True).encode()


def make_manifest(
    config: bytes, layers: list[bytes], *, docker: bool = False, layer_media_type: str | None = None
) -> tuple[bytes, str]:
    """A manifest for ``config`` + ``layers`` (OCI, or Docker v2 with ``docker``)."""
    mt = oci.MEDIA_TYPE_DOCKER_MANIFEST if docker else oci.MEDIA_TYPE_OCI_MANIFEST
    cmt = oci.MEDIA_TYPE_DOCKER_CONFIG if docker else oci.MEDIA_TYPE_OCI_CONFIG
    lmt = layer_media_type or (
        oci.MEDIA_TYPE_DOCKER_LAYER_GZIP if docker else oci.MEDIA_TYPE_OCI_LAYER_GZIP
    )
    doc = {
        "schemaVersion": 2,
        "mediaType": mt,
        "config": {"mediaType": cmt, "digest": oci.sha256_digest(config), "size": len(config)},
        "layers": [
            {"mediaType": lmt, "digest": oci.sha256_digest(b), "size": len(b)} for b in layers
        ],
    }
    return json.dumps(doc, indent=2).encode(), mt


def push_image(
    client: RegistryClient, repo: str, tag: str, layers: list[bytes], *, docker: bool = False
) -> tuple[str, bytes]:
    """Push ``layers`` (any bytes) as an image; returns (manifest digest, manifest bytes)."""
    config = image_config([oci.sha256_digest(b) for b in layers])
    for blob in [config, *layers]:
        client.push_blob(repo, oci.sha256_digest(blob), blob)
    manifest, mt = make_manifest(config, layers, docker=docker)
    digest = client.put_manifest(repo, tag, manifest, mt)
    return digest, manifest


def write_oci_layout(directory: Path, tag: str, layers: list[bytes]) -> str:
    """An OCI image layout at ``directory`` with one image tagged ``tag``; returns the
    manifest digest (``skopeo copy oci:DIR:TAG docker://...`` reads it)."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    config = image_config([oci.sha256_digest(b) for b in layers])
    manifest, mt = make_manifest(config, layers)
    for b in [config, *layers, manifest]:
        (blobs / hashlib.sha256(b).hexdigest()).write_bytes(b)
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    digest = oci.sha256_digest(manifest)
    index = {
        "schemaVersion": 2,
        "mediaType": oci.MEDIA_TYPE_OCI_INDEX,
        "manifests": [
            {
                "mediaType": mt,
                "digest": digest,
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (directory / "index.json").write_text(json.dumps(index))
    return digest


# --- pytest fixtures ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> CertPair:
    """A CA made for this session (for TLS registries and proxies)."""
    return make_ca(tmp_path_factory.mktemp("ca"))


def _registry(
    kind: str, tmp_path_factory: pytest.TempPathFactory, ca: CertPair | None = None
) -> Iterator[RegistryServer]:
    root = tmp_path_factory.mktemp(f"registry-{kind}")
    server = RegistryServer(kind, root, ca=ca)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)  # pushed images: up to GBs per session


@pytest.fixture(scope="session")
def registry_plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """docker-registry over plain HTTP, no auth."""
    yield from _registry("plain", tmp_path_factory)


@pytest.fixture(scope="session")
def registry_basic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """docker-registry with htpasswd Basic auth (user ``USER``, password ``PASSWORD``)."""
    yield from _registry("basic", tmp_path_factory)


@pytest.fixture(scope="session")
def registry_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """docker-registry with token auth; ``.token_server`` is the :class:`TokenServer`."""
    yield from _registry("token", tmp_path_factory)


@pytest.fixture(scope="session")
def registry_tls(
    tmp_path_factory: pytest.TempPathFactory, test_ca: CertPair
) -> Iterator[RegistryServer]:
    """docker-registry over HTTPS with a certificate from ``test_ca`` (127.0.0.1, localhost)."""
    yield from _registry("tls", tmp_path_factory, test_ca)


REGISTRY_KINDS = ("plain", "basic", "token", "tls")


@pytest.fixture(scope="session", params=REGISTRY_KINDS)
def registry_any(request: pytest.FixtureRequest) -> RegistryServer:
    """Each registry variant in turn."""
    server: RegistryServer = request.getfixturevalue(f"registry_{request.param}")
    return server


@pytest.fixture
def fault_proxy_factory() -> Iterator[Callable[..., FaultProxy]]:
    """``make(server, tls=None) -> FaultProxy`` in front of any registry; all stopped after
    the test. Use it to count bytes served per blob (:meth:`FaultProxy.blob_bytes`)."""
    made: list[FaultProxy] = []

    def make(server: RegistryServer, tls: CertPair | None = None) -> FaultProxy:
        proxy = FaultProxy(server, tls=tls)
        made.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for p in made:
            p.stop()


@pytest.fixture
def fault_proxy(registry_plain: RegistryServer) -> Iterator[FaultProxy]:
    """A fresh :class:`FaultProxy` in front of ``registry_plain`` (no faults until added)."""
    proxy = FaultProxy(registry_plain)
    try:
        yield proxy
    finally:
        proxy.stop()


def random_blob(size: int, seed: int = 0) -> bytes:
    """Deterministic pseudo-random bytes (incompressible, distinct per seed)."""
    return random.Random(seed).randbytes(size)


def os_env_without_proxy() -> dict[str, str]:
    """The environment for subprocesses (skopeo) without proxy variables."""
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


__all__ = [
    "USER",
    "PASSWORD",
    "SERVICE",
    "ISSUER",
    "REGISTRY_KINDS",
    "CertPair",
    "make_ca",
    "issue_cert",
    "basic_auth",
    "free_port",
    "TokenServer",
    "RegistryServer",
    "Fault",
    "FaultProxy",
    "ProxyRecord",
    "image_config",
    "make_manifest",
    "push_image",
    "write_oci_layout",
    "random_blob",
    "os_env_without_proxy",
    "test_ca",
    "registry_plain",
    "registry_basic",
    "registry_token",
    "registry_tls",
    "registry_any",
    "fault_proxy",
    "fault_proxy_factory",
]
