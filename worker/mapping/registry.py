"""The schema registry's REST API (Confluent-compatible: Confluent, Apicurio's /apis/ccompat/v7, Karapace).

Async (aiohttp) so the event loop never waits on it. Two kinds of failure, told apart here once so the
callers never guess: `SchemaNotFound` (the registry answered, and the schema id or reference does not exist:
records naming it can never decode) and `RegistryUnavailable` (no usable answer: connection refused, timeout,
5xx, 429, auth refused, a 404 that is not the registry's own "not found" — retried with an alarm, never a
reason to dead-letter a record). Response bodies are never logged or repeated: only the status and the
registry's numeric error code.
"""

from __future__ import annotations

import base64
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from worker.config import SchemaRegistrySettings
from worker.errors import WorkerError

ACCEPT = "application/vnd.schemaregistry.v1+json, application/json"
NOT_FOUND_CODES = frozenset({40401, 40402, 40403})
"""The Confluent API's "subject / version / schema not found" codes: a 404 without one of them is an
unknown path (a wrong `schema_registry.url`), which must not dead-letter every record."""
MAX_RESPONSE_BYTES = 16 * 1024 * 1024


class RegistryError(WorkerError):
    """`retriable`: the same request may succeed later."""

    retriable = True


class RegistryUnavailable(RegistryError):
    """No usable answer from the registry; the message says why (never the response body)."""


class SchemaNotFound(RegistryError):
    """The registry answered that the schema (or a subject/version it references) does not exist."""

    retriable = False


@dataclass(frozen=True, slots=True)
class Reference:
    """An import of another registered schema: `name` is how the schema refers to it (a .proto file name,
    an Avro type name), `subject`/`version` where it is registered."""

    name: str
    subject: str
    version: int


@dataclass(frozen=True, slots=True)
class RawSchema:
    """A schema as the registry returns it; `schema_type` is AVRO (the API's default), PROTOBUF or JSON."""

    schema_type: str
    text: str
    references: tuple[Reference, ...] = ()
    schema_id: int | None = None
    subject: str | None = None
    version: int | None = None


def parse_schema_response(body: Any, **known: Any) -> RawSchema:
    """A /schemas/ids/N or /subjects/S/versions/V body; a malformed one is the registry's fault (retriable)."""
    if not isinstance(body, dict) or not isinstance(body.get("schema"), str):
        raise RegistryUnavailable("the registry answered without a schema")
    references = []
    for ref in body.get("references") or ():
        try:
            references.append(Reference(str(ref["name"]), str(ref["subject"]), int(ref["version"])))
        except (KeyError, TypeError, ValueError):
            raise RegistryUnavailable("the registry answered with a malformed schema reference") from None
    schema_id = body.get("id", known.get("schema_id"))
    version = body.get("version", known.get("version"))
    return RawSchema(
        schema_type=str(body.get("schemaType") or "AVRO").upper(),
        text=body["schema"],
        references=tuple(references),
        schema_id=int(schema_id) if isinstance(schema_id, int) else None,
        subject=body.get("subject", known.get("subject")),
        version=int(version) if isinstance(version, int) else None,
    )


class RegistryClient:
    """One HTTP session to the registry; every call raises `SchemaNotFound` or `RegistryUnavailable`."""

    def __init__(self, settings: SchemaRegistrySettings) -> None:
        self.url = settings.url
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            s = self._settings
            headers = {"Accept": ACCEPT}
            if s.username and s.password is not None:
                token = f"{s.username}:{s.password.get_secret_value()}".encode()
                headers["Authorization"] = "Basic " + base64.b64encode(token).decode("ascii")
            context = ssl.create_default_context(cafile=str(s.ssl_cafile)) if s.ssl_cafile else None
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=s.request_timeout_seconds),
                headers=headers,
                connector=aiohttp.TCPConnector(ssl=context if context is not None else True, limit=8),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def get(self, path: str) -> Any:
        """GET one API path: the decoded JSON body."""
        try:
            async with self._open().get(self.url + path, allow_redirects=False) as response:
                status = response.status
                body = await response.content.read(MAX_RESPONSE_BYTES)
        except TimeoutError:
            raise RegistryUnavailable(
                f"no answer within {self._settings.request_timeout_seconds:g}s from {self.url}"
            ) from None
        except aiohttp.ClientError as error:
            raise RegistryUnavailable(f"cannot reach {self.url}: {type(error).__name__}: {error}"[:300]) from None
        try:
            data = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            data = None
        if status == 200:
            if data is None:
                raise RegistryUnavailable(f"{self.url} answered 200 without JSON")
            return data
        code = data.get("error_code") if isinstance(data, dict) else None
        if status == 404 and code in NOT_FOUND_CODES:
            raise SchemaNotFound(f"error code {code}")
        hint = ""
        if status == 404:
            hint = " without a registry error code: is schema_registry.url the API's base URL?"
        elif status in (401, 403):
            hint = ": check schema_registry.username and password"
        detail = f" (error code {code})" if code else ""
        raise RegistryUnavailable(f"{self.url} answered HTTP {status}{detail}{hint}")

    async def schema_by_id(self, schema_id: int) -> RawSchema:
        body = await self.get(f"/schemas/ids/{schema_id}")
        return parse_schema_response(body, schema_id=schema_id)

    async def schema_version(self, subject: str, version: int | str) -> RawSchema:
        body = await self.get(f"/subjects/{quote(subject, safe='')}/versions/{version}")
        return parse_schema_response(body, subject=subject)

    async def subjects(self) -> list[str]:
        body = await self.get("/subjects")
        if not isinstance(body, list):
            raise RegistryUnavailable("the registry's subject list is not a list")
        return [str(subject) for subject in body]
