"""Challenges, docker config credentials, the token cache and the Authenticator (no network)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from nydus.errors import ConfigError, RegistryAuthError
from nydus.http import Request, Response
from nydus.registry.auth import (
    Authenticator,
    Credentials,
    docker_config_credentials,
    parse_www_authenticate,
)
from registry import basic_auth

REALM = "https://auth.example/token"


def test_parse_challenges() -> None:
    (c,) = parse_www_authenticate(
        [
            'Bearer realm="https://auth.example/token",service="registry.example",'
            'scope="repository:a/b:pull,push repository:c:pull",error="insufficient_scope"'
        ]
    )
    assert c.scheme == "bearer" and c.realm == REALM and c.service == "registry.example"
    assert c.scopes == ("repository:a/b:pull,push", "repository:c:pull")
    assert c.params["error"] == "insufficient_scope"
    two = parse_www_authenticate(['Basic realm="x y", Bearer realm=r,service=s', "Negotiate"])
    assert [(c.scheme, c.params) for c in two] == [
        ("basic", {"realm": "x y"}),
        ("bearer", {"realm": "r", "service": "s"}),
        ("negotiate", {}),
    ]
    (q,) = parse_www_authenticate(['Basic realm="a \\"quoted\\" realm"'])
    assert q.realm == 'a "quoted" realm'


def test_credentials_from_auth() -> None:
    c = Credentials.from_auth(basic_auth("u", "p:w"))
    assert (c.username, c.password) == ("u", "p:w")
    assert c.basic_header() == "Basic " + basic_auth("u", "p:w")
    for bad in ("!!!", basic_auth("nocolon", "")[:-4] + "AAAA", "bm9jb2xvbg=="):
        with pytest.raises(ConfigError):
            Credentials.from_auth(bad)


def test_docker_config(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    assert docker_config_credentials("x", cfg) is None  # no file
    cfg.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": basic_auth("hub", "pw")},
                    "http://127.0.0.1:5000": {"username": "u", "password": "p"},
                    "ghcr.io": {"identitytoken": "id-tok"},
                    "tok.example/v2/": {"registrytoken": "bearer-tok"},
                    "empty.example": {},
                },
                "credHelpers": {"helped.example": "fake"},
                "credsStore": "store",
            }
        )
    )
    calls: list[tuple[str, str]] = []

    def helper(name: str, server: str) -> dict[str, Any] | None:
        calls.append((name, server))
        if name == "fake":
            return {"Username": "<token>", "Secret": "helper-id-token"}
        if server == "store.example":
            return {"Username": "su", "Secret": "sp"}
        return None

    def get(host: str) -> Credentials | None:
        return docker_config_credentials(host, cfg, run_helper=helper)

    assert get("registry-1.docker.io") == Credentials("hub", "pw")
    assert get("docker.io") == Credentials("hub", "pw")
    assert get("127.0.0.1:5000") == Credentials("u", "p")
    assert get("ghcr.io") == Credentials(identity_token="id-tok")
    assert get("tok.example") == Credentials(registry_token="bearer-tok")
    assert get("helped.example") == Credentials(identity_token="helper-id-token")
    assert get("store.example") == Credentials("su", "sp")
    assert get("empty.example") is None  # falls through to the store, which has nothing
    assert ("store", "empty.example") in calls
    cfg.write_text("{not json")
    with pytest.raises(ConfigError, match="not JSON"):
        get("x")


class FakeTokenServer:
    """Handler for MockTransport: a token realm with knobs."""

    def __init__(self) -> None:
        self.post_status = 200
        self.get_status = 200
        self.expires_in: int | None = 100
        self.n = 0
        self.requests: list[Request] = []

    def __call__(self, req: Request) -> Response:
        self.requests.append(req)
        status = self.post_status if req.method == "POST" else self.get_status
        if status != 200:
            return Response.from_bytes(status, b'{"error":"no"}')
        self.n += 1
        doc: dict[str, Any] = {"access_token" if req.method == "POST" else "token": f"t{self.n}"}
        if self.expires_in is not None:
            doc["expires_in"] = self.expires_in
        return Response.from_bytes(200, json.dumps(doc).encode())


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


CHALLENGE = [f'Bearer realm="{REALM}",service="svc",scope="repository:r:pull"']
PULL = ("repository:r:pull",)


def make_auth(server: FakeTokenServer, creds: Credentials | None, clock: Clock) -> Authenticator:
    return Authenticator(server, credentials=creds, clock=clock)


def test_bearer_post_then_cache_and_refresh() -> None:
    server, clock = FakeTokenServer(), Clock()
    auth = make_auth(server, Credentials("u", "p"), clock)
    assert auth.authorization("h", PULL) is None  # nothing known yet: anonymous first
    assert auth.handle_unauthorized("h", PULL, CHALLENGE, None)
    req = server.requests[0]
    assert req.method == "POST" and req.url == REALM
    form = parse_qs(req.body_bytes().decode())
    assert form["grant_type"] == ["password"] and form["username"] == ["u"]
    assert form["scope"] == ["repository:r:pull"] and form["service"] == ["svc"]
    assert auth.authorization("h", PULL) == "Bearer t1"
    clock.now += 79  # 100 s token, renewed 20 s before expiry
    assert auth.authorization("h", PULL) == "Bearer t1"
    clock.now += 2
    assert auth.authorization("h", PULL) == "Bearer t2"
    assert auth.authorization("h", ("repository:r:pull,push",)) == "Bearer t3"  # other scope
    # a 401 for the token we sent: forget it and fetch another
    assert auth.handle_unauthorized("h", PULL, CHALLENGE, "Bearer t2")
    assert auth.authorization("h", PULL) == "Bearer t4"


def test_bearer_default_ttl_and_get_fallback() -> None:
    server, clock = FakeTokenServer(), Clock()
    server.expires_in = None  # spec default: 60 s
    server.post_status = 405
    auth = make_auth(server, Credentials("u", "p"), clock)
    assert auth.handle_unauthorized("h", PULL, CHALLENGE, None)
    assert [r.method for r in server.requests] == ["POST", "GET"]
    get = server.requests[1]
    q = parse_qs(urlsplit(get.url).query)
    assert q["scope"] == ["repository:r:pull"] and q["service"] == ["svc"]
    assert get.headers["Authorization"] == Credentials("u", "p").basic_header()
    clock.now += 39
    assert auth.authorization("h", PULL) == "Bearer t1"
    clock.now += 2
    assert auth.authorization("h", PULL) == "Bearer t2"


def test_bearer_anonymous_and_refusals() -> None:
    server, clock = FakeTokenServer(), Clock()
    auth = make_auth(server, None, clock)
    assert auth.handle_unauthorized("h", PULL, CHALLENGE, None)
    assert [r.method for r in server.requests] == ["GET"]
    assert "Authorization" not in server.requests[0].headers
    server.get_status = 401
    server.post_status = 401
    auth = make_auth(server, Credentials("u", "bad"), clock)
    with pytest.raises(RegistryAuthError, match=r"refused credentials.*POST answered 401"):
        auth.handle_unauthorized("h", PULL, CHALLENGE, None)


def test_identity_token_uses_refresh_grant() -> None:
    server, clock = FakeTokenServer(), Clock()
    auth = make_auth(server, Credentials(identity_token="idt"), clock)
    auth.handle_unauthorized("h", PULL, CHALLENGE, None)
    form = parse_qs(server.requests[0].body_bytes().decode())
    assert form["grant_type"] == ["refresh_token"] and form["refresh_token"] == ["idt"]


def test_basic_and_registry_token() -> None:
    server, clock = FakeTokenServer(), Clock()
    auth = make_auth(server, Credentials("u", "p"), clock)
    assert auth.handle_unauthorized("h", PULL, ['Basic realm="r"'], None)
    assert auth.authorization("h", PULL) == Credentials("u", "p").basic_header()
    # the same header refused again: no point repeating
    assert not auth.handle_unauthorized(
        "h", PULL, ['Basic realm="r"'], auth.authorization("h", PULL)
    )
    anon = make_auth(server, None, clock)
    with pytest.raises(RegistryAuthError, match="none were configured"):
        anon.handle_unauthorized("h", PULL, ['Basic realm="r"'], None)
    bearer = make_auth(server, Credentials(registry_token="given"), clock)
    assert bearer.authorization("h", PULL) == "Bearer given"
    loaded: list[int] = []

    def loader() -> Credentials | None:
        loaded.append(1)
        return Credentials("lazy", "x")

    lazy = Authenticator(server, load_credentials=loader, clock=clock)
    assert not loaded
    assert lazy.credentials.username == "lazy" and lazy.credentials.username == "lazy"
    assert loaded == [1]
