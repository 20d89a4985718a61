"""SigV4 checks as AWS makes them: header shape, credential scope, access key, and, when a secret is
configured, the signature itself and the request's age (5 minutes either way).

AWS answers these before looking at the body, so a worker's clock drift or wrong secret shows up as one
request-level refusal, never as per-event rejections.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import lru_cache
from urllib.parse import quote

from aiohttp import web
from botocore.utils import normalize_url_path

# An error answer: (HTTP status, x-amzn-ErrorType, message).
Rejection = tuple[int, str, str]

# How far X-Amz-Date may be from the server's clock, either way, before the signature is refused.
MAX_SKEW_SECONDS = 300
_AMZ_DATE = "%Y%m%dT%H%M%SZ"

_AUTH_HEADER = re.compile(
    r"AWS4-HMAC-SHA256\s+Credential=(?P<credential>[^,\s]+)\s*,\s*"
    r"SignedHeaders=(?P<signed>[^,\s]+)\s*,\s*Signature=(?P<signature>[0-9a-fA-F]+)\s*$"
)
_MISMATCH = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. Consult the service documentation for details."
)


def _canonical_query(query: str) -> str:
    """Same as botocore's URL-derived canonical query: raw pairs, sorted."""
    if not query:
        return ""
    pairs = sorted(pair.partition("=")[::2] for pair in query.split("&"))
    return "&".join(f"{key}={value}" for key, value in pairs)


def _canonical_headers(request: web.BaseRequest, names: Sequence[str]) -> str:
    lines = [f"{name}:{','.join(' '.join(v.split()) for v in request.headers.getall(name, []))}" for name in names]
    return "\n".join(lines) + "\n"


class SigV4Verifier:
    """Checks the Authorization header; verifies the signature itself when a secret is configured."""

    def __init__(self, signing_name: str, access_key: str | None, secret_key: str | None) -> None:
        self.signing_name = signing_name
        self.access_key = access_key
        self.secret_key = secret_key
        self._keys: dict[tuple[str, str, str], bytes] = {}

    def check(self, request: web.BaseRequest, body: bytes, now: float) -> Rejection | None:
        """None when the request may go on; ``now`` is the server's wall clock (epoch seconds)."""
        header = request.headers.get("Authorization")
        if not header:
            return 403, "MissingAuthenticationTokenException", "Missing Authentication Token"
        match = _AUTH_HEADER.match(header)
        if match is None:
            return 403, "IncompleteSignatureException", "Authorization header is not a valid SigV4 header."
        scope = match["credential"].split("/")
        if len(scope) != 5 or scope[4] != "aws4_request":
            return (
                403,
                "IncompleteSignatureException",
                "Credential must be KEY/DATE/REGION/SERVICE/aws4_request.",
            )
        if scope[3] != self.signing_name:
            return (
                403,
                "InvalidSignatureException",
                (f"Credential should be scoped to correct service: '{self.signing_name}'."),
            )
        if self.access_key is not None and scope[0] != self.access_key:
            return (
                403,
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            )
        if self.secret_key is None:
            return None
        amz_date = request.headers.get("X-Amz-Date", "")
        if not amz_date.startswith(scope[1]):
            return 403, "IncompleteSignatureException", "X-Amz-Date is missing or does not match the scope."
        stale = request_age_problem(amz_date, now)
        if stale is not None:
            return 403, "InvalidSignatureException", stale
        return self._verify(request, body, amz_date, scope, match["signed"].split(";"), match["signature"].lower())

    def _verify(
        self, request: web.BaseRequest, body: bytes, amz_date: str, scope: list[str], signed: list[str], signature: str
    ) -> Rejection | None:
        path, _, query = request.raw_path.partition("?")
        canonical = "\n".join(
            (
                request.method.upper(),
                quote(normalize_url_path(path), safe="/~"),
                _canonical_query(query),
                _canonical_headers(request, signed),
                ";".join(signed),
                request.headers.get("X-Amz-Content-SHA256") or hashlib.sha256(body).hexdigest(),
            )
        )
        to_sign = "\n".join(
            (
                "AWS4-HMAC-SHA256",
                amz_date,
                "/".join(scope[1:]),
                hashlib.sha256(canonical.encode()).hexdigest(),
            )
        )
        key = self._signing_key(scope[1], scope[2], scope[3])
        expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        if hmac.compare_digest(expected, signature):
            return None
        return 403, "InvalidSignatureException", _MISMATCH

    def _signing_key(self, date: str, region: str, service: str) -> bytes:
        """Derived keys change once a day: cache them instead of four HMACs per request."""
        cached = self._keys.get((date, region, service))
        if cached is None:
            assert self.secret_key is not None
            cached = f"AWS4{self.secret_key}".encode()
            for part in (date, region, service, "aws4_request"):
                cached = hmac.new(cached, part.encode(), hashlib.sha256).digest()
            self._keys[(date, region, service)] = cached
        return cached


def _amz(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime(_AMZ_DATE)


@lru_cache(maxsize=8)
def _epoch(amz_date: str) -> float | None:
    """Parsed once per distinct second, not once per request."""
    try:
        return datetime.strptime(amz_date, _AMZ_DATE).replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def request_age_problem(amz_date: str, now: float) -> str | None:
    """AWS's own wording when X-Amz-Date is more than 5 minutes from its clock: a replayed or long-queued
    request, or a client whose clock drifted (the worker must alarm on it, not dead-letter events)."""
    signed_at = _epoch(amz_date)
    if signed_at is None:
        return f"Date must be in ISO-8601 'basic format'. Got '{amz_date}'."
    if signed_at < now - MAX_SKEW_SECONDS:
        return (
            f"Signature expired: {amz_date} is now earlier than {_amz(now - MAX_SKEW_SECONDS)} ({_amz(now)} - 5 min.)"
        )
    if signed_at > now + MAX_SKEW_SECONDS:
        return (
            f"Signature not yet current: {amz_date} is still later than {_amz(now + MAX_SKEW_SECONDS)} "
            f"({_amz(now)} + 5 min.)"
        )
    return None
