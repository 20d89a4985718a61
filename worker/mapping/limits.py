"""PutEvents limits read from botocore's shipped service model, so they follow AWS, not our memory.

Read once at import: the model file is part of the installed botocore, not run-time I/O.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import IO, Any, NamedTuple

import botocore.exceptions
import botocore.loaders
import orjson


class StringLimit(NamedTuple):
    """Length bounds (and pattern, if the model has one) of one string member."""

    min: int
    max: int
    pattern: re.Pattern[str] | None = None


class FastJSONFileLoader(botocore.loaders.JSONFileLoader):
    """botocore's model file loader, parsing with orjson: the same files, the same values in the same order
    (tests/test_startup_model_files.py compares them with botocore's own parse), as plain dicts instead of
    OrderedDicts (botocore only reads them). Building the client parses endpoints.json (1.2 MB) and four
    smaller files; json with an OrderedDict hook made that ~6% of the worker's start-up instructions."""

    def _load_file(self, full_path: str, open_method: Callable[..., IO[bytes]]) -> Any:
        if not os.path.isfile(full_path):
            return None
        with open_method(full_path, "rb") as file:
            payload = file.read()
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError:  # what only Python's json reads (NaN, in a model a user added): botocore's way
            return super()._load_file(full_path, open_method)  # type: ignore[misc]


_BotocoreLoader: Any = botocore.loaders.Loader  # its private helpers are not in the stubs


class SharedLoader(_BotocoreLoader):  # type: ignore[misc]
    """botocore's data loader, asking only about the one service it loads whether botocore knows it.

    botocore's `load_service_model` first lists every service that has a file of the type (~420 directories,
    ~1,200 stat calls: 1.5% of the worker's start-up each, for service-2 here and endpoint-rule-set-1 in the
    client). A service is in that list exactly when `list_api_versions` finds a version of it with such a file
    (the same search paths, the same file check), so that is asked instead; an unknown one goes to botocore's
    own code, for its UnknownServiceError. The rest is botocore's method as it is (tests/test_startup_model_files.py
    compares the models, the extras and the errors with a plain loader's)."""

    @botocore.loaders.instance_cache
    def load_service_model(self, service_name: str, type_name: str, api_version: str | None = None) -> Any:
        try:
            self.list_api_versions(service_name, type_name)
        except botocore.exceptions.DataNotFoundError:
            return super().load_service_model(service_name, type_name, api_version)
        if not (hasattr(self, "_extras_processor") and hasattr(self, "_find_extras")):  # another botocore
            return super().load_service_model(service_name, type_name, api_version)
        if api_version is None:
            api_version = self.determine_latest_version(service_name, type_name)
        model = self.load_data(os.path.join(service_name, api_version, type_name))
        self._extras_processor.process(model, self._find_extras(service_name, type_name, api_version))
        return model


LOADER = SharedLoader(file_loader=FastJSONFileLoader())
"""botocore's data loader as a session without `data_path` builds it (but for its faster file parser and
service check); its caches shared by whoever reads the model (personalize.operations.spec, the client's
session): each fresh loader lists every service botocore ships again (~7 ms of start-up CPU)."""

SERVICE_MODEL: dict[str, Any] = LOADER.load_service_model("personalize-events", "service-2")
"""Read-only: the very dict the botocore client's service model wraps (the loader caches it)."""

_SHAPES: dict[str, Any] = SERVICE_MODEL["shapes"]


def _string(shape_name: str) -> StringLimit:
    shape = _SHAPES[shape_name]
    pattern = shape.get("pattern")
    return StringLimit(
        min=int(shape.get("min", 0)),
        max=int(shape["max"]),
        pattern=re.compile(pattern) if pattern else None,
    )


def _member(structure: str, member: str) -> StringLimit:
    return _string(_SHAPES[structure]["members"][member]["shape"])


def _list_bounds(structure: str, member: str) -> tuple[int, int]:
    shape = _SHAPES[_SHAPES[structure]["members"][member]["shape"]]
    return int(shape["min"]), int(shape["max"])


TRACKING_ID = _member("PutEventsRequest", "trackingId")
SESSION_ID = _member("PutEventsRequest", "sessionId")
USER_ID = _member("PutEventsRequest", "userId")
EVENT_ID = _member("Event", "eventId")
EVENT_TYPE = _member("Event", "eventType")
ITEM_ID = _member("Event", "itemId")
PROPERTIES = _member("Event", "properties")
RECOMMENDATION_ID = _member("Event", "recommendationId")
ATTRIBUTION_SOURCE = _member("MetricAttribution", "eventAttributionSource")
EVENTS_PER_CALL = _list_bounds("PutEventsRequest", "eventList")
IMPRESSION_ITEMS = _list_bounds("Event", "impression")
IMPRESSION_ITEM = _string(_SHAPES[_SHAPES["Event"]["members"]["impression"]["shape"]]["member"]["shape"])

_RESERVED_DOC = re.compile(r"can't be included as a keyword", re.IGNORECASE)
_LIST_ITEM_DOC = re.compile(r"<li>\s*<p>\s*([^<]+?)\s*</p>\s*</li>")


def reserved_property_keys(documentation: str) -> frozenset[str]:
    """The keys `properties` must not use, as the model's documentation lists them (lower case)."""
    found = _RESERVED_DOC.search(documentation)
    if found is None:
        return frozenset()
    return frozenset(key.lower() for key in _LIST_ITEM_DOC.findall(documentation, found.end()))


RESERVED_PROPERTY_KEYS = reserved_property_keys(_SHAPES["Event"]["members"]["properties"].get("documentation", ""))

# Not in the model: the documented service quota of 10 KB per event.
MAX_EVENT_BYTES = 10 * 1024
