"""`[personalize]`: the tracker or dataset written to, the endpoint, the client's limits and proxy."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from worker.config.base import Section, region_name
from worker.mapping import limits

SCHEMA_ARN = re.compile(r"arn:aws[a-z-]*:personalize:[a-z0-9-]+:[0-9]{12}:schema/[a-zA-Z0-9_-]{1,63}")


class PersonalizeSettings(Section):
    # Required without `[[routes]]` (the single flow's tracker); with routes each route names its destination.
    tracking_id: str | None = Field(default=None, min_length=limits.TRACKING_ID.min, max_length=limits.TRACKING_ID.max)
    region: str = "us-east-1"
    endpoint_url: str = ""  # empty: the real AWS endpoint of the region
    # The control plane (`personalize`, not `personalize-events`), used only to read mapping.schema_arn at
    # start-up; a separate key because the two services have different endpoints. Empty: the region's.
    control_endpoint_url: str = ""
    max_in_flight: int = Field(default=64, ge=1, le=1024)
    max_requests_per_second: float = Field(default=1000.0, gt=0)
    request_timeout_seconds: float = Field(default=10.0, gt=0)
    # botocore's Config(proxies=...): endpoint scheme -> proxy URL (user:password@ allowed). None: the
    # environment's HTTP(S)_PROXY / NO_PROXY, as botocore does; {} = always connect directly.
    proxies: dict[Literal["http", "https"], SecretStr] | None = None
    proxy_ca_bundle: Path | None = None  # verifies an https:// proxy's own certificate (default: the AWS CA bundle)
    proxy_client_cert: Path | None = None  # PEM client certificate for an https:// proxy that asks for one
    proxy_client_key: Path | None = None  # its key, when not in the certificate file

    @field_validator("proxies")
    @classmethod
    def _proxy_urls(
        cls, value: dict[Literal["http", "https"], SecretStr] | None
    ) -> dict[Literal["http", "https"], SecretStr] | None:
        for scheme, url in (value or {}).items():
            text = url.get_secret_value()
            # botocore reads a URL without a scheme as http://; the URL is not echoed: it may hold a password.
            if "://" in text and not text.startswith(("http://", "https://")):
                raise ValueError(f"the {scheme} proxy must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _key_needs_cert(self) -> PersonalizeSettings:
        if self.proxy_client_key is not None and self.proxy_client_cert is None:
            raise ValueError("proxy_client_key needs proxy_client_cert")
        return self

    # Attempts of an event failing alone (its call halved down to it) while other calls are accepted, before
    # it is dead-lettered as retries_exhausted. 10 with the backoff's 10 s cap: at most ~35 s of waiting, about
    # two minutes if every attempt also times out. Failures while the service fails for everyone never count.
    max_event_attempts: int = Field(default=10, ge=1, le=20)

    @field_validator("endpoint_url", "control_endpoint_url")
    @classmethod
    def _endpoint_valid(cls, value: str) -> str:
        if value:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{value!r} is not an http(s) URL with a host")
        return value

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        return region_name(value)
