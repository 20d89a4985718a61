"""Request bodies of the five operations, around records already serialized as JSON.

Records are serialized once, when mapped (as the pipeline keeps PutEvents events); a call's body is then
a few joins, not a second serialization of every member. Timestamps stay epoch seconds with
milliseconds, which REST-JSON allows (botocore's serializer would cut them to whole seconds).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import orjson

from worker.personalize.operations.spec import ACTION_INTERACTIONS, ACTIONS, EVENTS, ITEMS, USERS, OperationSpec

Body = Callable[[str, Sequence[str]], bytes]
"""(destination, serialized records) → the request body."""


def _list_body(spec: OperationSpec) -> Body:
    destination_member = orjson.dumps(spec.destination)
    middle = b',"' + spec.list_member.encode() + b'":['

    def body(destination: str, records: Sequence[str]) -> bytes:
        return b"".join(
            (b"{", destination_member, b":", orjson.dumps(destination), middle, ",".join(records).encode(), b"]}")
        )

    body.__doc__ = f"The {spec.name} body: {{{spec.destination}, {spec.list_member}: [records]}}."
    return body


items_body = _list_body(ITEMS)
users_body = _list_body(USERS)
actions_body = _list_body(ACTIONS)
action_interactions_body = _list_body(ACTION_INTERACTIONS)


def events_body(tracking_id: str, session_id: str, user_id: str | None, records: Sequence[str]) -> bytes:
    """The PutEvents body: one session per call, so sessionId and userId are per call, not per record
    (the same bytes as `client.request_body`)."""
    head: dict[str, str] = {EVENTS.destination: tracking_id, "sessionId": session_id}
    if user_id is not None:
        head["userId"] = user_id
    return b"".join(
        (orjson.dumps(head)[:-1], b',"', EVENTS.list_member.encode(), b'":[', ",".join(records).encode(), b"]}")
    )


BODIES: dict[str, Body] = {
    ITEMS.key: items_body,
    USERS.key: users_body,
    ACTIONS.key: actions_body,
    ACTION_INTERACTIONS.key: action_interactions_body,
}
"""The body of each operation whose calls carry only a destination (PutEvents has `events_body`)."""
