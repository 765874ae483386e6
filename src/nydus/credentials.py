"""What counts as a credential here, and how it is kept out of logs and other users' reach.

Secrets reach this project as snapshot labels (``containerd.io/snapshot/pullsecret``, passed by
a caller for one image), nydusd config keys (``auth``, ``registry_token``, S3/OSS keys), HTTP
headers (``Authorization``) and signed URLs (a registry's redirect to object storage).

- Redaction for logs and API answers: :func:`redact_labels`, :func:`redact_config`,
  :func:`redact_headers`, :func:`redact_url`, and :class:`RedactingFilter`, a logging filter
  that blanks the value of any secret key a message prints as a dict or JSON (a safety net under
  the explicit helpers, installed on every log handler the daemons set up).
- Private files: :func:`private_dir` makes (or tightens) a directory to 0700,
  :func:`private_file` creates (or tightens) a file to 0600, and :class:`PrivateFileHandler` /
  :class:`PrivateRotatingFileHandler` are log handlers whose files are 0600.

Pure functions and stateless classes; safe from any thread.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
from collections.abc import Mapping
from typing import IO, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = [
    "REDACTED",
    "SECRET_CONFIG_KEYS",
    "is_secret_label",
    "is_secret_key",
    "redact_labels",
    "redact_config",
    "redact_headers",
    "redact_url",
    "RedactingFilter",
    "private_dir",
    "private_file",
    "PrivateFileHandler",
    "PrivateRotatingFileHandler",
]

REDACTED = "<redacted>"

#: nydusd config keys (v1 and v2) whose values are credentials.
SECRET_CONFIG_KEYS = frozenset(
    {
        "auth",
        "registry_token",
        "access_key_id",
        "access_key_secret",
        "encryption_key",
        "password",
        "token",
        "secret",
        "session_token",
        "identitytoken",
        "identity_token",
    }
)

# a key is secret when its last path component names one of these
_SECRET_WORDS = (
    "secret",
    "password",
    "passwd",
    "token",
    "auth",
    "credential",
    "apikey",
    "api_key",
    "access_key",
    "private_key",
    "encryption_key",
)
_SECRET_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-amz-security-token",
        "x-registry-auth",
    }
)
_SECRET_QUERY = (
    "signature",
    "sig",
    "token",
    "credential",
    "security-token",
    "secret",
    "access_key",
    "accesskey",
    "password",
)


def is_secret_key(key: str) -> bool:
    """Whether a config/label/field name holds a credential (``auth``, ``pullsecret``, ...)."""
    last = key.rsplit("/", 1)[-1].rsplit(".", 1)[-1].lower()
    if last in SECRET_CONFIG_KEYS:
        return True
    if "author" in last or last.endswith("type"):
        return False
    return any(word in last for word in _SECRET_WORDS)


def is_secret_label(key: str) -> bool:
    """Whether a snapshot label carries a credential (``containerd.io/snapshot/pullsecret``,
    and any label whose last name component says secret/password/token/auth)."""
    return is_secret_key(key)


def redact_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``labels`` with credential values replaced by ``<redacted>``."""
    return {k: (REDACTED if is_secret_label(k) and v else v) for k, v in labels.items()}


def redact_config(obj: Any) -> Any:
    """A copy of a config dict with credentials blanked (for info answers and logs)."""
    if isinstance(obj, Mapping):
        return {
            k: (
                ""
                if isinstance(k, str) and k.lower() in SECRET_CONFIG_KEYS and v
                else redact_config(v)
            )
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [redact_config(v) for v in obj]
    return obj


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """A copy of HTTP ``headers`` with credentials (Authorization, cookies) redacted."""
    return {k: (REDACTED if k.lower() in _SECRET_HEADERS else v) for k, v in headers.items()}


def redact_url(url: str) -> str:
    """``url`` without user info and with signature/token query values redacted."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, REDACTED if any(w in k.lower() for w in _SECRET_QUERY) else v) for k, v in pairs],
            safe="<>",
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


# 'key': 'value' / "key": "value" / key=value in a formatted message, for secret keys
_KEY = r"[\w./-]*(?:secret|password|passwd|token|auth|credential|access_key|encryption_key)\w*"
_QUOTED_PAIR = re.compile(
    r"""(?P<k>(?P<q>['"])""" + _KEY + r"""(?P=q)\s*:\s*)"""
    r"""(?P<vq>['"])(?P<v>(?:\\.|(?!(?P=vq)).)*)(?P=vq)""",
    re.IGNORECASE,
)
_AUTH_HEADER = re.compile(
    r"(?P<k>\b(?:proxy-)?authorization\s*[:=]\s*['\"]?)(?P<v>[^'\"\r\n,}]+)", re.IGNORECASE
)


def _scrub(text: str) -> str:
    text = _QUOTED_PAIR.sub(lambda m: m.group("k") + m.group("vq") + REDACTED + m.group("vq"), text)
    return _AUTH_HEADER.sub(lambda m: m.group("k") + REDACTED, text)


class RedactingFilter(logging.Filter):
    """Blanks secret values that a log message prints as ``'key': 'value'`` pairs (dict
    reprs, JSON) or as an ``Authorization`` header. Install it on handlers."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        scrubbed = _scrub(message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        return True


def private_dir(path: str | os.PathLike[str]) -> None:
    """Create ``path`` (and missing parents) and make it mode 0700, tightening it if it
    already existed with a looser mode."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    if os.stat(path).st_mode & 0o777 != 0o700:
        os.chmod(path, 0o700)


def private_file(path: str | os.PathLike[str]) -> None:
    """Create ``path`` if missing and make it mode 0600 (an existing file is tightened)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _open_private(filename: str, mode: str, encoding: str | None, errors: str | None) -> IO[str]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    fd = os.open(filename, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        return open(fd, mode, encoding=encoding, errors=errors)
    except BaseException:
        os.close(fd)
        raise


class PrivateFileHandler(logging.FileHandler):
    """A :class:`logging.FileHandler` whose file is mode 0600."""

    def _open(self) -> IO[str]:  # type: ignore[override]
        return _open_private(self.baseFilename, self.mode, self.encoding, self.errors)


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A :class:`logging.handlers.RotatingFileHandler` whose files are mode 0600."""

    def _open(self) -> IO[str]:  # type: ignore[override]
        return _open_private(self.baseFilename, self.mode, self.encoding, self.errors)
