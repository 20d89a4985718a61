"""Which HTTP proxy PutEvents goes through, decided exactly as botocore decides it.

botocore takes the client Config's `proxies` when set (`{}` means: never a proxy), else the environment
(`HTTP_PROXY`, `HTTPS_PROXY`, `NO_PROXY`, in either case) through `get_environ_proxies(endpoint_url)`;
the proxy is the one for the endpoint's scheme. Credentials in the proxy URL become a basic
Proxy-Authorization header. `proxies_config` holds the TLS settings for an https:// proxy. The same
botocore functions decide here, on the same inputs, so `run` (worker/personalize/http.py) and `check` (aiobotocore)
always agree; `proxy_use_forwarding_for_https` is not offered: aiobotocore ignores it too.

How a connection goes through the proxy is here too (`connect_via`); worker/personalize/http.py does the rest.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast
from urllib.parse import urlsplit

from botocore.httpsession import ProxyConfiguration
from botocore.utils import get_environ_proxies

from worker.errors import ConfigError

if TYPE_CHECKING:
    from worker.config.personalize import PersonalizeSettings


class ProxyError(ConnectionError):
    """The proxy did not open the way to the endpoint: unreachable, refused CONNECT, wants credentials,
    or answered in its own name. A connection error to the retry logic; the message names the proxy as
    scheme://host:port, never its credentials. `status` is the proxy's HTTP status when it answered one."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Proxy:
    """An HTTP(S) proxy in front of the endpoint."""

    url: str
    """scheme://host:port without credentials: the name used in logs and errors."""
    host: str
    port: int
    authorization: str | None = field(default=None, repr=False)
    """The Proxy-Authorization value from user:password in the proxy URL: a secret, never logged."""
    ssl_context: ssl.SSLContext | None = None
    """TLS to the proxy itself (an https:// proxy); the endpoint's TLS then runs inside the tunnel."""


def client_options(settings: PersonalizeSettings) -> dict[str, Any]:
    """`proxies` and `proxies_config` for the botocore client Config: `run` and `check` both take theirs
    from here, so they cannot disagree about the proxy."""
    options: dict[str, Any] = {}
    if settings.proxies is not None:
        options["proxies"] = {scheme: url.get_secret_value() for scheme, url in settings.proxies.items()}
    proxies_config: dict[str, Any] = {}
    if settings.proxy_ca_bundle is not None:
        proxies_config["proxy_ca_bundle"] = str(settings.proxy_ca_bundle)
    if settings.proxy_client_cert is not None:
        cert = str(settings.proxy_client_cert)
        key = settings.proxy_client_key
        proxies_config["proxy_client_cert"] = (cert, str(key)) if key is not None else cert
    if proxies_config:
        options["proxies_config"] = proxies_config
    return options


def resolve_proxy(endpoint_url: str, config: Any, default_cafile: str | None = None) -> Proxy | None:
    """The proxy botocore would use for `endpoint_url` with client Config `config`, or None for a direct
    connection. `default_cafile` verifies an https:// proxy when `proxy_ca_bundle` is not set: botocore
    then uses the endpoint's CA bundle for it."""
    proxies = config.proxies
    if proxies is None:  # as botocore's EndpointCreator: the environment only when the Config says nothing
        proxies = get_environ_proxies(endpoint_url)
    settings: dict[str, Any] = dict(config.proxies_config or {})
    botocore_view = ProxyConfiguration(proxies=proxies, proxies_settings=settings)
    proxy_url = botocore_view.proxy_url_for(endpoint_url)
    if not proxy_url:
        return None
    # botocore reads "socks5://p" as "http://socks5://p" (host "socks5"): refused here instead.
    given = str(proxies.get(urlsplit(endpoint_url).scheme, ""))
    scheme = given.split("://", 1)[0] if "://" in given else "http"
    parts = urlsplit(proxy_url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if scheme not in ("http", "https") or not parts.hostname or port == -1:
        # The URL itself is not shown: it may carry credentials.
        raise ConfigError(
            f"the proxy for {endpoint_url} must be an http:// or https:// URL with a host and a valid port"
            f" (scheme {scheme!r})"
        )
    host = parts.hostname
    port = port or (443 if parts.scheme == "https" else 80)
    shown = f"[{host}]" if ":" in host else host
    context = None
    if parts.scheme == "https":
        try:
            context = ssl.create_default_context(cafile=settings.get("proxy_ca_bundle") or default_cafile)
            cert = settings.get("proxy_client_cert")
            if isinstance(cert, tuple):
                context.load_cert_chain(cert[0], keyfile=cert[1])
            elif cert:
                context.load_cert_chain(cert)
        except OSError as error:  # ssl.SSLError is one: a bad CA or client certificate file
            raise ConfigError(f"proxy TLS settings (proxy_ca_bundle, proxy_client_cert): {error}") from None
    return Proxy(
        url=f"{parts.scheme}://{shown}:{port}",
        host=host,
        port=port,
        authorization=botocore_view.proxy_headers_for(proxy_url).get("Proxy-Authorization"),
        ssl_context=context,
    )


def status_text(status: int) -> str:
    """A proxy's status with the standard phrase (its own text is not repeated: it may carry internals)
    and, for an auth refusal, what to fix."""
    try:
        text = f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        text = str(status)
    if status in (401, 407):
        text += " (proxy credentials missing or rejected: user:password in the proxy URL)"
    return text


class _Answer(Protocol):
    status: int


class _Connection(Protocol):
    """What `connect_via` needs of worker/personalize/http.py's connection protocol."""

    transport: asyncio.Transport | None
    closed: bool
    used: bool

    def request(self, data: bytes, deadline: float, *, tunnel: bool = False) -> Awaitable[_Answer]: ...

    def close(self) -> None: ...


C = TypeVar("C", bound=_Connection)


async def connect_via(
    proxy: Proxy, factory: Callable[[], C], authority: str, endpoint_ssl: ssl.SSLContext | None, deadline: float
) -> C:
    """A connection to the proxy (TLS to it for an https:// proxy). For an https:// endpoint (`endpoint_ssl`),
    a CONNECT tunnel to `authority` (host:port) with TLS to the endpoint inside: SNI and the certificate
    check are against the endpoint's name, as on a direct connection; the proxy sees only ciphertext."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout_at(deadline):
            _, protocol = await loop.create_connection(
                cast(Callable[[], asyncio.BaseProtocol], factory),  # a C is one; a Protocol type cannot say so
                proxy.host,
                proxy.port,
                ssl=proxy.ssl_context,
                server_hostname=proxy.host if proxy.ssl_context else None,
            )
    except TimeoutError:
        raise TimeoutError(f"no connection to proxy {proxy.url} within the request timeout") from None
    except OSError as error:
        raise ProxyError(f"cannot reach proxy {proxy.url}: {error}") from error
    connection = cast(C, protocol)
    if endpoint_ssl is None:
        return connection
    try:
        await _tunnel(connection, proxy, authority, endpoint_ssl, deadline)
    except BaseException:
        connection.close()
        raise
    return connection


async def _tunnel(
    connection: _Connection, proxy: Proxy, authority: str, endpoint_ssl: ssl.SSLContext, deadline: float
) -> None:
    auth = f"Proxy-Authorization: {proxy.authorization}\r\n" if proxy.authorization else ""
    head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{auth}\r\n"
    try:
        answer = await connection.request(head.encode("latin-1"), deadline, tunnel=True)
    except TimeoutError:
        raise TimeoutError(f"proxy {proxy.url} did not answer CONNECT within the request timeout") from None
    except OSError as error:
        raise ProxyError(f"proxy {proxy.url} failed CONNECT to {authority}: {error}") from error
    if not 200 <= answer.status < 300:
        raise ProxyError(
            f"proxy {proxy.url} refused CONNECT to {authority}: {status_text(answer.status)}", answer.status
        )
    if connection.closed:  # bytes before our TLS hello: not a clean tunnel
        raise ProxyError(f"proxy {proxy.url} sent data into the tunnel to {authority} before TLS")
    assert connection.transport is not None
    host = authority.rsplit(":", 1)[0].strip("[]")
    async with asyncio.timeout_at(deadline):
        transport = await asyncio.get_running_loop().start_tls(
            connection.transport, cast(asyncio.BaseProtocol, connection), endpoint_ssl, server_hostname=host
        )
    if transport is None:  # typeshed allows it; only a closed transport gives it
        raise ProxyError(f"proxy {proxy.url} closed the tunnel to {authority}")
    connection.transport = transport
    connection.used = False  # the CONNECT was not a request: a first failure in the tunnel is no stale reuse
