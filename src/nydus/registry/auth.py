"""Registry authentication: credentials, ``WWW-Authenticate`` challenges, the bearer token cache.

Owns where credentials come from and how a request gets its ``Authorization`` header:

- :class:`Credentials` from the client's arguments (``auth`` = base64 ``user:pass``,
  ``registry_token``) or from a docker ``config.json`` (:func:`docker_config_credentials`:
  ``auths[host].auth`` / ``username`` + ``password`` / ``identitytoken`` / ``registrytoken``,
  and optionally ``credHelpers`` / ``credsStore`` helpers ``docker-credential-<name> get``).
- :func:`parse_www_authenticate` reads ``Basic`` and ``Bearer realm,service,scope`` challenges.
- :class:`Authenticator` remembers each host's challenge, answers Basic ones with the
  credentials, and for Bearer ones gets a token from the realm: POST with a form
  (``grant_type=password`` or ``refresh_token``), then GET (``?service&scope``, Basic-authed)
  when the POST is refused, as upstream nydus does; anonymous pulls go straight to GET. Tokens
  are cached per (realm, service, scopes) and renewed 20 s before they expire
  (``expires_in``, 60 s when the server does not say, per the distribution token spec).

Threading: one :class:`Authenticator` is shared by all threads of a client. The cache is
locked; concurrent requests that need the same token wait for one fetch (per-key lock).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from nydus.errors import ConfigError, NydusError, RegistryAuthError
from nydus.http import Request, Response, TransportError
from nydus.registry.reference import normalize_registry

__all__ = [
    "Credentials",
    "Challenge",
    "Token",
    "TokenCache",
    "Authenticator",
    "DEFAULT_DOCKER_CONFIG",
    "parse_www_authenticate",
    "docker_config_credentials",
    "REFRESH_MARGIN",
    "DEFAULT_TOKEN_TTL",
]

from ..format.safejson import parse_json, parse_json_object

log = logging.getLogger("nydus.registry")

DEFAULT_DOCKER_CONFIG = "~/.docker/config.json"
#: Seconds before expiry at which a cached token is no longer handed out.
REFRESH_MARGIN = 20.0
#: TTL assumed when a token response has no ``expires_in`` (distribution token spec).
DEFAULT_TOKEN_TTL = 60.0
_CLIENT_ID = "nydus-py"
_DOCKER_HUB_CONFIG_KEY = "https://index.docker.io/v1/"

Send = Callable[[Request], Response]
Scopes = tuple[str, ...]


@dataclass(frozen=True)
class Credentials:
    """What we can prove: a user and password, an OAuth refresh (identity) token, and/or a
    bearer token to send as is."""

    username: str = ""
    password: str = ""
    identity_token: str = ""
    registry_token: str = ""

    @classmethod
    def from_auth(cls, auth: str) -> Credentials:
        """From base64 ``user:pass`` (the ``auth`` key of nydusd and docker config)."""
        try:
            raw = base64.b64decode(auth.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise ConfigError("registry auth is not base64 of 'user:password'") from None
        user, sep, password = raw.partition(":")
        if not sep:
            raise ConfigError("registry auth does not decode to 'user:password'")
        return cls(username=user, password=password)

    @property
    def has_password(self) -> bool:
        return bool(self.username)

    def basic_header(self) -> str | None:
        if not self.username:
            return None
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge; ``scheme`` lower-case, ``params`` keys lower-case."""

    scheme: str
    params: dict[str, str]

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")

    @property
    def service(self) -> str:
        return self.params.get("service", "")

    @property
    def scopes(self) -> Scopes:
        return tuple(s for s in self.params.get("scope", "").split(" ") if s)


def parse_www_authenticate(values: Sequence[str]) -> list[Challenge]:
    """Parse ``WWW-Authenticate`` header values (each may hold several challenges)."""
    out: list[Challenge] = []
    for value in values:
        out.extend(_parse_one_header(value))
    return out


def _parse_one_header(s: str) -> list[Challenge]:
    out: list[Challenge] = []
    i, n = 0, len(s)
    current: Challenge | None = None

    def skip(chars: str) -> None:
        nonlocal i
        while i < n and s[i] in chars:
            i += 1

    while i < n:
        skip(" \t,")
        if i >= n:
            break
        start = i
        while i < n and s[i] not in " \t,=":
            i += 1
        token = s[start:i]
        skip(" \t")
        if i < n and s[i] == "=" and current is not None:
            i += 1
            skip(" \t")
            if i < n and s[i] == '"':
                i += 1
                buf = []
                while i < n and s[i] != '"':
                    if s[i] == "\\" and i + 1 < n:
                        i += 1
                    buf.append(s[i])
                    i += 1
                i += 1  # closing quote
                val = "".join(buf)
            else:
                vstart = i
                while i < n and s[i] not in ",":
                    i += 1
                val = s[vstart:i].strip()
            current.params[token.lower()] = val
        elif token:
            if i < n and s[i] == "=":  # token68 with no scheme yet: ignore
                i += 1
                continue
            current = Challenge(token.lower(), {})
            out.append(current)
    return out


@dataclass
class Token:
    value: str
    expires_at: float  # clock() time
    refresh_token: str = ""

    def valid(self, now: float) -> bool:
        return now < self.expires_at


_TokenKey = tuple[str, str, Scopes]


class TokenCache:
    """Bearer tokens per (realm, service, scopes), with one fetch at a time per key."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[_TokenKey, Token] = {}
        self._key_locks: dict[_TokenKey, threading.Lock] = {}

    def get(self, key: _TokenKey) -> Token | None:
        with self._lock:
            tok = self._tokens.get(key)
        return tok if tok is not None and tok.valid(self._clock()) else None

    def invalidate(self, key: _TokenKey, value: str | None = None) -> None:
        """Forget the token for ``key`` (only if it is still ``value``, when given)."""
        with self._lock:
            tok = self._tokens.get(key)
            if tok is not None and (value is None or tok.value == value):
                del self._tokens[key]

    def get_or_fetch(self, key: _TokenKey, fetch: Callable[[], Token]) -> Token:
        tok = self.get(key)
        if tok is not None:
            return tok
        with self._lock:
            klock = self._key_locks.setdefault(key, threading.Lock())
        with klock:
            tok = self.get(key)
            if tok is not None:
                return tok
            tok = fetch()
            with self._lock:
                self._tokens[key] = tok
            return tok

    def clear(self) -> None:
        with self._lock:
            self._tokens.clear()


# --- docker config.json -------------------------------------------------------------------


def _config_key_host(key: str) -> str:
    """``https://index.docker.io/v1/`` → ``docker.io``; ``http://h:5000/x`` → ``h:5000``."""
    k = key.strip()
    if "://" in k:
        k = urlsplit(k).netloc
    else:
        k = k.split("/", 1)[0]
    return normalize_registry(k)


def docker_config_credentials(
    host: str,
    path: str | os.PathLike[str],
    *,
    run_helper: Callable[[str, str], dict[str, Any] | None] | None = None,
) -> Credentials | None:
    """Credentials for registry ``host`` from a docker ``config.json``, or None.

    Looks at ``credHelpers[host]``, then ``auths`` (``auth``, ``username``/``password``,
    ``identitytoken``, ``registrytoken``), then ``credsStore``. A missing file means None; a
    malformed one raises :class:`ConfigError`. ``run_helper(helper, server_url)`` returns the
    helper's JSON answer (``Username``/``Secret``) or None; the default runs
    ``docker-credential-<helper> get``.
    """
    p = Path(os.fspath(path)).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"cannot read docker config {p}: {e}") from None
    doc = parse_json_object(text, f"docker config {p}", error=ConfigError)
    want = normalize_registry(host)
    server_url = _DOCKER_HUB_CONFIG_KEY if want == "docker.io" else want
    runner = run_helper or _run_credential_helper

    helpers = doc.get("credHelpers")
    if isinstance(helpers, dict):
        for key, helper in helpers.items():
            if _config_key_host(key) == want and isinstance(helper, str) and helper:
                creds = _helper_credentials(runner, helper, server_url)
                if creds is not None:
                    return creds

    auths = doc.get("auths")
    if isinstance(auths, dict):
        for key, entry in auths.items():
            if _config_key_host(key) != want or not isinstance(entry, dict):
                continue
            creds = _entry_credentials(entry, p)
            if creds is not None:
                return creds

    store = doc.get("credsStore")
    if isinstance(store, str) and store:
        return _helper_credentials(runner, store, server_url)
    return None


def _entry_credentials(entry: dict[str, Any], path: Path) -> Credentials | None:
    user = entry.get("username") or ""
    password = entry.get("password") or ""
    auth = entry.get("auth") or ""
    if isinstance(auth, str) and auth:
        try:
            c = Credentials.from_auth(auth)
        except ConfigError as e:
            raise ConfigError(f"docker config {path}: {e}") from None
        user, password = c.username, c.password
    identity = entry.get("identitytoken") or ""
    registry_token = entry.get("registrytoken") or ""
    if not (user or identity or registry_token):
        return None
    return Credentials(
        username=str(user),
        password=str(password),
        identity_token=str(identity),
        registry_token=str(registry_token),
    )


def _helper_credentials(
    runner: Callable[[str, str], dict[str, Any] | None], helper: str, server_url: str
) -> Credentials | None:
    answer = runner(helper, server_url)
    if not answer:
        return None
    user = str(answer.get("Username") or "")
    secret = str(answer.get("Secret") or "")
    if user == "<token>":
        return Credentials(identity_token=secret)
    if not user:
        return None
    return Credentials(username=user, password=secret)


def _run_credential_helper(helper: str, server_url: str) -> dict[str, Any] | None:
    exe = f"docker-credential-{helper}"
    try:
        proc = subprocess.run(
            [exe, "get"], input=server_url, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("credential helper %s failed: %s", exe, e)
        return None
    if proc.returncode != 0:
        # its output is not logged: a helper may print the secret it was asked about
        log.debug("credential helper %s exited with status %d", exe, proc.returncode)
        return None
    try:
        answer = parse_json(proc.stdout, f"answer of credential helper {exe}")
    except NydusError:
        log.warning("credential helper %s printed no JSON", exe)
        return None
    return answer if isinstance(answer, dict) else None


# --- the authenticator --------------------------------------------------------------------


class Authenticator:
    """Per-client auth state: challenges seen per host, credentials, bearer tokens.

    ``send`` performs one request to a token realm (the client passes a function that goes
    through its transport with retries for transient failures). ``load_credentials`` is called
    once, lazily, the first time credentials are needed (docker config lookup).
    """

    def __init__(
        self,
        send: Send,
        *,
        credentials: Credentials | None = None,
        load_credentials: Callable[[], Credentials | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._send = send
        self._clock = clock
        self._lock = threading.Lock()
        self._creds = credentials
        self._loader = load_credentials if credentials is None else None
        self._challenges: dict[str, Challenge] = {}
        self.tokens = TokenCache(clock)
        self.token_requests = 0

    @property
    def credentials(self) -> Credentials:
        with self._lock:
            if self._loader is not None:
                loader, self._loader = self._loader, None
                self._creds = loader()
            return self._creds or Credentials()

    def authorization(self, host: str, scopes: Scopes) -> str | None:
        """The ``Authorization`` value to send to ``host`` for ``scopes`` (fetching a token
        if the host is known to want one), or None."""
        with self._lock:
            ch = self._challenges.get(host)
        creds = self.credentials
        if ch is None:
            if creds.registry_token:
                return "Bearer " + creds.registry_token
            return None
        if ch.scheme == "basic":
            return creds.basic_header()
        if ch.scheme == "bearer":
            key = (ch.realm, ch.service, scopes)
            tok = self.tokens.get_or_fetch(key, lambda: self._fetch_token(ch, scopes))
            return "Bearer " + tok.value
        return None

    def handle_unauthorized(
        self, host: str, scopes: Scopes, www_authenticate: Sequence[str], sent: str | None
    ) -> bool:
        """Learn from a 401. True if repeating the request with new auth may succeed."""
        challenges = parse_www_authenticate(www_authenticate)
        creds = self.credentials
        bearer = next((c for c in challenges if c.scheme == "bearer" and c.realm), None)
        basic = next((c for c in challenges if c.scheme == "basic"), None)
        if bearer is not None:
            with self._lock:
                self._challenges[host] = bearer
            key = (bearer.realm, bearer.service, scopes)
            if sent and sent.startswith("Bearer "):
                self.tokens.invalidate(key, sent[len("Bearer ") :])
            extra = tuple(s for s in bearer.scopes if s not in scopes)
            want = scopes + extra
            tok = self.tokens.get_or_fetch(key, lambda: self._fetch_token(bearer, want))
            return sent != "Bearer " + tok.value
        if basic is not None:
            with self._lock:
                self._challenges[host] = basic
            header = creds.basic_header()
            if header is None:
                raise RegistryAuthError(
                    f"registry {host} requires credentials (Basic auth) and none were configured"
                )
            return sent != header
        return False

    def _fetch_token(self, ch: Challenge, scopes: Scopes) -> Token:
        creds = self.credentials
        realm = ch.realm
        self.token_requests += 1
        post_failure = ""
        if creds.identity_token or creds.has_password:
            form: dict[str, str] = {"client_id": _CLIENT_ID, "access_type": "offline"}
            if ch.service:
                form["service"] = ch.service
            if scopes:
                form["scope"] = " ".join(scopes)
            if creds.identity_token:
                form["grant_type"] = "refresh_token"
                form["refresh_token"] = creds.identity_token
            else:
                form["grant_type"] = "password"
                form["username"] = creds.username
                form["password"] = creds.password
            body = urlencode(form).encode()
            req = Request(
                "POST",
                realm,
                {
                    "Content-Type": "application/x-www-form-urlencoded",
                    "Content-Length": str(len(body)),
                },
                body,
            )
            with self._send(req) as resp:
                if resp.status == 200:
                    return self._parse_token(resp, realm)
                post_failure = f"POST answered {resp.status}"
                log.debug("token POST to %s answered %s; trying GET", realm, resp.status)
        params: list[tuple[str, str]] = []
        if ch.service:
            params.append(("service", ch.service))
        params.extend(("scope", s) for s in scopes)
        if creds.username:
            params.append(("account", creds.username))
        url = realm + ("&" if "?" in realm else "?") + urlencode(params) if params else realm
        headers: dict[str, str] = {}
        basic = creds.basic_header()
        if basic:
            headers["Authorization"] = basic
        with self._send(Request("GET", url, headers)) as resp:
            if resp.status == 200:
                return self._parse_token(resp, realm)
            detail = _error_text(resp)
            what = "credentials" if (basic or creds.identity_token) else "anonymous access"
            also = f"; {post_failure}" if post_failure else ""
            raise RegistryAuthError(
                f"token server {realm} refused {what} for scope {' '.join(scopes) or '(none)'}"
                f": GET answered {resp.status}{also}{detail}"
            )

    def _parse_token(self, resp: Response, realm: str) -> Token:
        try:
            raw = resp.read_all(limit=1 << 20)
        except TransportError as e:
            raise RegistryAuthError(f"token server {realm} sent a bad answer: {e}") from None
        doc = parse_json_object(raw, f"answer of token server {realm}", error=RegistryAuthError)
        value = doc.get("token") or doc.get("access_token")
        if not isinstance(value, str) or not value:
            raise RegistryAuthError(f"token server {realm} sent no token")
        ttl = doc.get("expires_in")
        ttl_s = float(ttl) if isinstance(ttl, int | float) and ttl > 0 else DEFAULT_TOKEN_TTL
        margin = min(REFRESH_MARGIN, ttl_s / 2)
        refresh = doc.get("refresh_token")
        return Token(
            value,
            self._clock() + ttl_s - margin,
            refresh if isinstance(refresh, str) else "",
        )

    def reset(self) -> None:
        """Forget challenges and tokens (after credentials change)."""
        with self._lock:
            self._challenges.clear()
        self.tokens.clear()


def _error_text(resp: Response) -> str:
    try:
        raw = resp.read(4096)
    except TransportError:
        return ""
    text = raw.decode("utf-8", "replace").strip()
    return f" ({text[:300]})" if text else ""
