"""`Mapper.member` for the common mapping and the common record, in one pass (issue 13).

The common mapping: every member one key of the message (properties side by side in one object), no
`where`, no renames, no attribution, numeric timestamps read as epochs. The common record: eventType,
sessionId, itemId and eventId strings of valid length, userId one too or absent, a float sentAt that is a
real instant, eventValue absent or a finite 32-bit float, no recommendationId or impression, properties
strings or absent. Decoded, mapped and serialized in one function: `member` and `_map` are two calls per
record, and a Python call costs about as much as the tests of a few members. Any other record goes to
`Mapper.member` from the start, which gives the same member or the same error as always. Reading every
member first (`map(obj.get, keys)`, one C loop) is safe: `dict.get` of a key neither fails nor has effects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from worker.mapping import limits
from worker.mapping.identity import event_bytes, may_exceed_quota
from worker.mapping.values import MAX_EPOCH_SECONDS

if TYPE_CHECKING:
    from worker.mapping.mapper import Mapper

Member = tuple[tuple[str, str | None], str, float, str]
Convert = Callable[[Any, Any], Member | None]

_EVENT_TYPE_MIN, _EVENT_TYPE_MAX = limits.EVENT_TYPE.min, limits.EVENT_TYPE.max
_SESSION_ID_MIN, _SESSION_ID_MAX = limits.SESSION_ID.min, limits.SESSION_ID.max
_USER_ID_MIN, _USER_ID_MAX = limits.USER_ID.min, limits.USER_ID.max
_ITEM_ID_MIN, _ITEM_ID_MAX = limits.ITEM_ID.min, limits.ITEM_ID.max
_EVENT_ID_MIN, _EVENT_ID_MAX = limits.EVENT_ID.min, limits.EVENT_ID.max
_PROPERTIES_MIN, _PROPERTIES_MAX = limits.PROPERTIES.min, limits.PROPERTIES.max
_FLOAT_MAX = 3.4e38
"""eventValue is a 32-bit float in the model (see `values.to_float`)."""


def flat_member(mapper: Mapper) -> Convert | None:
    """`mapper.member` with the common record taken in one pass; None when the mapping is not the common one."""
    m = mapper
    common = m._flat and m._where is None and not m._attributed and not m._renames and not m._only_listed
    if not (common and m._numbers_are_epochs and (m._leaves is not None or not m._properties)):
        return None
    generic = m.member
    keys = (
        m._event_type_key,
        m._session_id_key,
        m._user_id_key,
        m._sent_at_key,
        m._item_id_key,
        m._event_value_key,
        m._recommendation_id_key,
        m._impression_key,
        m._event_id_key,
    )
    leaves = m._leaves or ()
    at_top, parent_key = m._properties_at_top, m._properties_key
    milliseconds_above, surely_fits = m._milliseconds_above, m._surely_fits
    loads, dumps, decode_error = orjson.loads, orjson.dumps, orjson.JSONDecodeError

    def member(record: Any, partition: Any = None) -> Member | None:
        value = record.value
        try:
            obj = loads(value) if value else None
        except decode_error:
            obj = None
        if type(obj) is not dict:
            return generic(record, partition)  # the error, as ever
        event_type, session_id, user_id, sent_at, item_id, amount, recommendation_id, impression, event_id = map(
            obj.get, keys
        )
        if not (
            type(event_type) is str
            and _EVENT_TYPE_MIN <= len(event_type) <= _EVENT_TYPE_MAX
            and type(session_id) is str
            and _SESSION_ID_MIN <= len(session_id) <= _SESSION_ID_MAX
            and (user_id is None or (type(user_id) is str and _USER_ID_MIN <= len(user_id) <= _USER_ID_MAX))
            and type(item_id) is str
            and _ITEM_ID_MIN <= len(item_id) <= _ITEM_ID_MAX
            and type(event_id) is str
            and _EVENT_ID_MIN <= len(event_id) <= _EVENT_ID_MAX
            and type(sent_at) is float
            and (amount is None or (type(amount) is float and -_FLOAT_MAX <= amount <= _FLOAT_MAX))
            and recommendation_id is None
            and impression is None
        ):
            return generic(record, partition)
        # `round_ms` of a real instant, as `Mapper._map` has it inline.
        seconds = sent_at / 1000.0 if sent_at > milliseconds_above else sent_at
        scaled = seconds * 1000.0
        fraction = scaled % 1.0
        if fraction < 0.46875 and 1.0 <= seconds <= MAX_EPOCH_SECONDS:
            sent_at = (scaled - fraction) / 1000.0
        elif fraction > 0.53125 and 1.0 <= seconds <= MAX_EPOCH_SECONDS:
            sent_at = (scaled - fraction + 1.0) / 1000.0
        else:
            return generic(record, partition)
        event: dict[str, Any] = {"eventType": event_type, "sentAt": sent_at, "itemId": item_id}
        if amount is not None:
            event["eventValue"] = amount
        if leaves:
            parent = obj if at_top else obj.get(parent_key)
            if type(parent) is dict:
                found: dict[str, Any] = {}
                for key, leaf in leaves:
                    field = parent.get(leaf)
                    if type(field) is str:
                        found[key] = field
                    elif field is not None:
                        return generic(record, partition)
                if found:
                    properties = dumps(found).decode()
                    if not _PROPERTIES_MIN <= len(properties) <= _PROPERTIES_MAX:
                        return generic(record, partition)
                    event["properties"] = properties
        event["eventId"] = event_id
        if len(value) > surely_fits and may_exceed_quota(event) and event_bytes(event) > limits.MAX_EVENT_BYTES:
            return generic(record, partition)
        return (session_id, user_id), event_id, sent_at, dumps(event).decode()

    return member
