"""Where a mapped member comes from: a plain dotted path, or a JMESPath expression, compiled once.

A plain path (`properties.sku`) stays what it always was: a tuple of keys the mapper walks inline, the
fast path. Anything else is JMESPath (jmespath ships with botocore: no new dependency), so users get
fallbacks (`context.session_id || anonymousId`), literals (`'Purchase'`), indexing
(`products[0].id`), projections (`products[].id`) and functions (`to_string`, `join`). jmespath's own
interpreter costs ~6 µs for `a || b`; the common node types are compiled here into closures (~0.3 µs),
the rare ones (filters, slices, multi-selects) are handed to jmespath's interpreter, so the results
are always jmespath's.

The Kafka record is addressable under the reserved top-level name `_kafka` (see `KAFKA`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import orjson
from jmespath import exceptions as jmespath_errors
from jmespath import functions as jmespath_functions
from jmespath.parser import Parser
from jmespath.visitor import TreeInterpreter
from jmespath.visitor import _equals as jmespath_equals  # its equality: 1 == true is false, unlike Python's

Getter = Callable[[Any], Any]
Source = tuple[str, ...] | Getter
"""A compiled member source: a plain path (keys to walk) or a closure over the decoded object."""

KAFKA: Final = "_kafka"
"""Reserved top-level name: `_kafka.key`, `_kafka.topic`, `_kafka.partition`, `_kafka.offset`,
`_kafka.timestamp` (ms) and `_kafka.headers.<name>` (text; quote odd names: `_kafka.headers."content-type"`).
It shadows a `_kafka` field of the message itself."""

# Characters that make a mapping string an expression; a string without any is a plain dotted path.
# `-`, `$` and spaces are not among them: `page-category` was a plain key before expressions existed.
_SYNTAX: Final = frozenset("[]|&(){}*!=<>,'\"`@:?\\")
_INTERPRETER = TreeInterpreter()
_FUNCTIONS = jmespath_functions.Functions()


def is_plain(text: str) -> bool:
    """True for a dotted path of keys, the mapper's fast path."""
    return not _SYNTAX.intersection(text)


def plain_path(text: str) -> tuple[str, ...]:
    """The keys of a plain path; a segment of digits is refused, since a list index never matches it."""
    parts = tuple(text.split("."))
    for index, part in enumerate(parts):
        if not part:
            raise ValueError(f"{text!r} is not a dotted path to a member (an empty name in it)")
        if part.isdigit():
            head = ".".join(parts[:index]) or "@"
            tail = "".join(f".{p}" for p in parts[index + 1 :])
            raise ValueError(
                f"{text!r}: {part!r} is a key name here, never a list index; "
                f"write {head}[{part}]{tail} for item {part} of a list "
                f'(or {head}."{part}"{tail} for an object key named {part})'
            )
    return parts


def compile_source(text: str) -> Source:
    """A plain path as keys, anything else as a compiled JMESPath expression; ValueError names the fault."""
    if not text.strip():
        raise ValueError(f"{text!r} is not a dotted path to a member (an empty name in it)")
    if is_plain(text):
        return plain_path(text)
    return _compile(_parse(text))


def is_truthy(value: Any) -> bool:
    """JMESPath's truth: false, null, '', [] and {} are false; numbers (0 too) are true."""
    return not (value is None or value is False or (type(value) in (str, list, dict) and not value))


def references_kafka(text: str) -> bool:
    """Whether a mapping string reads the Kafka record (so the mapper must be handed it)."""
    if is_plain(text):
        return text.split(".", 1)[0] == KAFKA
    return any(node.get("type") == "field" and node.get("value") == KAFKA for node in _nodes(_parse(text)))


def field_names(text: str) -> list[str]:
    """The last key of a plain path, or of an expression's first field path: what a property is named."""
    if is_plain(text):
        return [text.rsplit(".", 1)[-1]]
    return [str(node["value"]) for node in _nodes(_parse(text)) if node.get("type") == "field"]


_SUBVALUE_NODES: Final = frozenset(
    {"field", "subexpression", "index_expression", "index", "or_expression", "and_expression", "not_expression",
     "comparator", "flatten", "projection", "current", "identity", "literal"}
)  # fmt: skip


def literal_bytes(text: str) -> int | None:
    """For the mapper's size bound: when every value `text` can yield is a value of the message (or part
    of it), a boolean or one of its literals, the bytes its literals take as JSON; None when it can build
    longer values (functions, multi-selects: `join`, `[a, a]`)."""
    if is_plain(text):
        return 0
    total = 0
    for node in _nodes(_parse(text)):
        if node["type"] not in _SUBVALUE_NODES:
            return None
        if node["type"] == "literal":
            total += len(orjson.dumps(node["value"]))
    return total


def _parse(text: str) -> dict[str, Any]:
    try:
        ast: dict[str, Any] = Parser().parse(text).parsed
    except jmespath_errors.JMESPathError as error:
        # jmespath's message spans lines with a caret under the fault: keep its first line only.
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{text!r} is not a valid expression (JMESPath): {first}") from None
    for node in _nodes(ast):
        if node.get("type") == "function_expression":
            _check_function(text, node)
    return ast


def _check_function(text: str, node: dict[str, Any]) -> None:
    """Unknown names and wrong argument counts are found at start-up, not on the first record."""
    name = node["value"]
    spec = _FUNCTIONS.FUNCTION_TABLE.get(name)
    if spec is None:
        raise ValueError(f"{text!r}: unknown function {name}()")
    signature = spec["signature"]
    given = len(node["children"])
    variadic = bool(signature) and signature[-1].get("variadic", False)
    if given < len(signature) or (given > len(signature) and not variadic):
        raise ValueError(f"{text!r}: {name}() takes {len(signature)} argument(s), given {given}")


def _nodes(node: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, dict) and "type" in current:
            found.append(current)
            stack.extend(current.get("children", ()))
    return found


def _compile(node: dict[str, Any]) -> Getter:
    """A closure computing what jmespath's TreeInterpreter would for `node` (same semantics, no dispatch)."""
    kind = node["type"]
    children = node.get("children", [])
    if kind == "field":
        return _field(node["value"])
    if kind == "subexpression" and all(child["type"] == "field" for child in children):
        return _fields(tuple(child["value"] for child in children))
    if kind in ("subexpression", "index_expression", "pipe"):
        return _chain([_compile(child) for child in children])
    if kind == "index":
        return _index(node["value"])
    if kind == "literal":
        return _literal(node["value"])
    if kind in ("current", "identity"):
        return _current
    if kind == "or_expression":
        return _or(_compile(children[0]), _compile(children[1]))
    if kind == "and_expression":
        return _and(_compile(children[0]), _compile(children[1]))
    if kind == "flatten":
        return _flatten(_compile(children[0]))
    if kind == "projection":
        return _projection(_compile(children[0]), _compile(children[1]))
    if kind == "comparator" and node["value"] in ("eq", "ne"):
        equal = node["value"] == "eq"
        left, right = children
        if right["type"] == "literal" and type(right["value"]) is str:
            return _equals_text(_compile(left), right["value"], equal)  # `type == 'track'`: the common one
        return _equality(_compile(left), _compile(right), equal)
    if kind == "multi_select_list":
        return _multi_select_list([_compile(child) for child in children])
    if kind == "function_expression" and not any(c.get("type") == "expref" for c in children):
        return _function(node["value"], [_compile(child) for child in children])
    return _interpreted(node)


def _field(name: str) -> Getter:
    def field(value: Any) -> Any:
        return value.get(name) if type(value) is dict else None

    return field


def _fields(names: tuple[str, ...]) -> Getter:
    """`a.b.c`: the walk of a plain path, in one closure (as the mapper's own `_walk`)."""

    if len(names) == 2:  # `properties.price`, `context.sessionId`: most paths in expressions
        first, second = names

        def two_fields(value: Any) -> Any:
            if type(value) is not dict:
                return None
            value = value.get(first)
            return value.get(second) if type(value) is dict else None

        return two_fields

    def fields(value: Any) -> Any:
        for name in names:
            if type(value) is not dict:
                return None
            value = value.get(name)
        return value

    return fields


def _equality(left: Getter, right: Getter, equal: bool) -> Getter:
    def equality(value: Any) -> Any:
        return jmespath_equals(left(value), right(value)) is equal

    return equality


def _equals_text(left: Getter, text: str, equal: bool) -> Getter:
    """`x == 'text'`: jmespath's special cases (0, 1 against booleans) never apply to a string."""

    def equals_text(value: Any) -> Any:
        return (left(value) == text) is equal

    return equals_text


def _multi_select_list(items: list[Getter]) -> Getter:
    def multi_select_list(value: Any) -> Any:
        return None if value is None else [item(value) for item in items]

    return multi_select_list


def _chain(steps: list[Getter]) -> Getter:
    if len(steps) == 2:
        first, second = steps

        def pair(value: Any) -> Any:
            return second(first(value))

        return pair

    def chain(value: Any) -> Any:
        for step in steps:
            value = step(value)
        return value

    return chain


def _index(position: int) -> Getter:
    def index(value: Any) -> Any:
        if type(value) is not list:
            return None
        try:
            return value[position]
        except IndexError:
            return None

    return index


def _literal(constant: Any) -> Getter:
    def literal(value: Any) -> Any:
        return constant

    return literal


def _current(value: Any) -> Any:
    return value


def _or(left: Getter, right: Getter) -> Getter:
    def either(value: Any) -> Any:
        found = left(value)
        if found is None or found is False or (type(found) in (str, list, dict) and not found):
            return right(value)
        return found

    return either


def _and(left: Getter, right: Getter) -> Getter:
    def both(value: Any) -> Any:
        found = left(value)
        if found is None or found is False or (type(found) in (str, list, dict) and not found):
            return found
        return right(value)

    return both


def _flatten(base: Getter) -> Getter:
    def flatten(value: Any) -> Any:
        items = base(value)
        if type(items) is not list:
            return None
        merged: list[Any] = []
        for item in items:
            if type(item) is list:
                merged.extend(item)
            else:
                merged.append(item)
        return merged

    return flatten


def _projection(base: Getter, each: Getter) -> Getter:
    def projection(value: Any) -> Any:
        items = base(value)
        if type(items) is not list:
            return None
        collected = []
        for item in items:
            result = each(item)
            if result is not None:
                collected.append(result)
        return collected

    return projection


def _function(name: str, arguments: list[Getter]) -> Getter:
    if name == "not_null":  # the fallback that keeps false and 0; no argument types to check
        return _not_null(arguments)
    call = _FUNCTIONS.call_function

    def function(value: Any) -> Any:
        return call(name, [argument(value) for argument in arguments])

    return function


def _not_null(arguments: list[Getter]) -> Getter:
    def not_null(value: Any) -> Any:
        for argument in arguments:
            found = argument(value)
            if found is not None:
                return found
        return None

    return not_null


def _interpreted(node: dict[str, Any]) -> Getter:
    visit = _INTERPRETER.visit

    def interpreted(value: Any) -> Any:
        return visit(node, value)

    return interpreted
