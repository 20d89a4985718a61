"""Kafka compression codecs: which ones this install can decode, and what to say when one cannot.

aiokafka decodes gzip with the standard library and snappy, lz4 and zstd with `cramjam`, which it
imports only if present: without it, the first compressed batch fails the fetch with
UnsupportedCodecError. Java and MSK producers often compress, so this is checked, not assumed.
"""

from __future__ import annotations

from collections.abc import Callable

from aiokafka import codec
from aiokafka.errors import UnsupportedCodecError

_Coder = Callable[[bytes], bytes]
CODECS: dict[str, tuple[_Coder, _Coder]] = {
    "gzip": (codec.gzip_encode, codec.gzip_decode),
    "snappy": (codec.snappy_encode, codec.snappy_decode),
    "lz4": (codec.lz4_encode, codec.lz4_decode),
    "zstd": (codec.zstd_encode, codec.zstd_decode),
}
HINT = "aiokafka decodes snappy, lz4 and zstd with cramjam: install it (aiokafka[lz4,snappy,zstd], a dependency)"
_SAMPLE = b'{"event_type": "click", "session_id": "s"}' * 40


def missing() -> list[str]:
    """The codecs that fail a round trip through aiokafka's own functions (the ones a fetch uses)."""
    absent: list[str] = []
    for name, (encode, decode) in CODECS.items():
        try:
            works = bytes(decode(encode(_SAMPLE))) == _SAMPLE
        except Exception:  # NotImplementedError when the library is absent; anything else is as fatal
            works = False
        if not works:
            absent.append(name)
    return absent


def hint_for(error: BaseException) -> str | None:
    """What to do about an error, where the error's own message does not say it."""
    return HINT if isinstance(error, UnsupportedCodecError) else None
