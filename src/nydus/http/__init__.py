"""One HTTP stack for every client (registry, blob backends, converter stores, nydusd API).

Below ``registry/`` and ``storage/`` (imports neither): the transport seam and its pooled,
TLS-, proxy- and unix-socket-capable implementation (``transport.py``), proxy fallback with
health checks (``proxy.py``), the retry policy (``retry.py``), range checks (``ranges.py``)
and a retrying client for the blob backends (``client.py``). Thread-safe throughout.
"""

from .client import HttpClient, HttpConfig, HttpError, make_transport
from .proxy import ProxyTransport
from .ranges import parse_content_range, range_header, read_range
from .retry import DEFAULT_RETRIES, Attempts, RetryPolicy, effective_retries, parse_retry_after
from .transport import (
    Headers,
    HTTPTransport,
    MockTransport,
    Request,
    Response,
    TLSError,
    Transport,
    TransportError,
    make_ssl_context,
)

__all__ = [
    "HttpClient",
    "HttpConfig",
    "HttpError",
    "make_transport",
    "ProxyTransport",
    "parse_content_range",
    "range_header",
    "read_range",
    "DEFAULT_RETRIES",
    "Attempts",
    "RetryPolicy",
    "effective_retries",
    "parse_retry_after",
    "Headers",
    "HTTPTransport",
    "MockTransport",
    "Request",
    "Response",
    "TLSError",
    "Transport",
    "TransportError",
    "make_ssl_context",
]
