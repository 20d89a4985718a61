"""Which proxy: `worker.personalize.proxy.resolve_proxy` decides exactly as aiobotocore does (environment, NO_PROXY,
the Config's `proxies`, `{}`), and refuses what it cannot use, naming the key and never the URL."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import aioboto3
import pytest
from aiobotocore.config import AioConfig
from botocore.config import Config

from tests.proxy_support import PROXY_VARIABLES
from worker.config import PersonalizeSettings
from worker.errors import ConfigError
from worker.personalize.proxy import client_options, resolve_proxy


@pytest.fixture
def environment(no_proxy_environment: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    no_proxy_environment.setenv("AWS_ACCESS_KEY_ID", "a")
    no_proxy_environment.setenv("AWS_SECRET_ACCESS_KEY", "b")
    return no_proxy_environment


@pytest.fixture
def botocore_environ(environment: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    yield environment
    for name in PROXY_VARIABLES:
        environment.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("variables", "config_proxies", "endpoint"),
    [
        ({}, None, "https://personalize-events.us-east-1.amazonaws.com"),
        (
            {"HTTPS_PROXY": "http://u:p%40ss@proxy.corp:3128"},
            None,
            "https://personalize-events.us-east-1.amazonaws.com",
        ),
        ({"https_proxy": "proxy.corp:3128"}, None, "https://personalize-events.us-east-1.amazonaws.com"),
        ({"HTTP_PROXY": "http://proxy.corp:3128"}, None, "https://personalize-events.us-east-1.amazonaws.com"),
        ({"HTTP_PROXY": "http://proxy.corp:3128"}, None, "http://10.1.2.3:8787"),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": ".amazonaws.com"}, None, "https://x.us-east-1.amazonaws.com"),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "amazonaws.com"}, None, "https://x.us-east-1.amazonaws.com"),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "other.com"}, None, "https://x.us-east-1.amazonaws.com"),
        ({"HTTP_PROXY": "http://p:1", "no_proxy": "emulator:8787"}, None, "http://emulator:8787"),
        ({"HTTPS_PROXY": "http://p:1"}, {}, "https://x.us-east-1.amazonaws.com"),
        ({"HTTPS_PROXY": "http://p:1"}, {"https": "https://tls-proxy:8443"}, "https://x.amazonaws.com"),
        ({}, {"http": "http://[::1]:3128"}, "http://emulator:8787"),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "*"}, {"https": "http://q:2"}, "https://x.amazonaws.com"),
    ],
)
async def test_resolution_is_the_one_aiobotocore_uses(
    botocore_environ: pytest.MonkeyPatch,
    variables: dict[str, str],
    config_proxies: dict[str, str] | None,
    endpoint: str,
) -> None:
    for name, value in variables.items():
        botocore_environ.setenv(name, value)
    settings = PersonalizeSettings.model_validate(
        {"tracking_id": "trk", "endpoint_url": endpoint, "proxies": config_proxies}
    )
    config = AioConfig(**client_options(settings))
    async with aioboto3.Session().client(
        "personalize-events", region_name="us-east-1", endpoint_url=endpoint, config=config
    ) as client:
        theirs = cast(Any, client)._endpoint.http_session._proxy_config  # what aiobotocore connects through
        expected = theirs.proxy_url_for(client.meta.endpoint_url)
        ours = resolve_proxy(client.meta.endpoint_url, client.meta.config)
    if not expected:
        assert ours is None
        return
    assert ours is not None
    parts = urlsplit(expected)
    assert (ours.host, ours.port) == (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    assert ours.url.startswith(f"{parts.scheme}://")
    assert (ours.ssl_context is not None) == (parts.scheme == "https")
    if parts.password:
        assert ours.authorization == "Basic " + base64.b64encode(b"u:p@ss").decode()


@pytest.mark.parametrize("url", ["socks5://user:S3cret@p:1080", "http://user:S3cret@p:notaport", "http://:1"])
def test_an_unusable_proxy_url_is_a_config_error_without_the_url(url: str) -> None:
    with pytest.raises(ConfigError, match="must be an http:// or https:// URL") as caught:
        resolve_proxy("https://x.amazonaws.com", Config(proxies={"https": url}))
    assert "S3cret" not in str(caught.value)


def test_bad_proxy_tls_files_name_the_keys(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError, match=r"proxy_ca_bundle, proxy_client_cert"):
        resolve_proxy(
            "https://x.amazonaws.com",
            Config(proxies={"https": "https://p:3129"}, proxies_config={"proxy_ca_bundle": str(missing)}),
        )
    settings = PersonalizeSettings(tracking_id="t", proxy_client_cert=tmp_path / "c.pem", proxy_client_key=missing)
    assert client_options(settings) == {
        "proxies_config": {"proxy_client_cert": (str(tmp_path / "c.pem"), str(missing))}
    }
