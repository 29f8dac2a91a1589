"""The legacy queue contract in one place: what a request and a response message look like.

A request is an SQS message whose body is the input object's key (``test_000.jpg``) and whose ``key`` attribute
is a correlation id; a ``version-id`` attribute (sent by this project's web tier, optional for other producers)
names the exact upload to read. The answer is the output object ``test_000`` (the key without its extension)
holding the name, and a response message whose body is the Python tuple repr ``('test_000', 'Paul')`` with the
same ``key`` attribute. A request's ``reply-to`` attribute (this project's web tier names the inbox its request
waits on) is copied onto its answer, so that the answer goes straight to that inbox whoever reads it.
"""

from __future__ import annotations

import ast
import posixpath

KEY_ATTRIBUTE = "key"
VERSION_ATTRIBUTE = "version-id"
REPLY_TO_ATTRIBUTE = "reply-to"


def output_key(input_key: str) -> str:
    """``test_000.jpg`` -> ``test_000`` (the filename without its extension)."""
    return posixpath.splitext(input_key)[0]


def response_body(stem: str, name: str) -> str:
    """The Python tuple repr that old web tiers parse with ``strip("()").split(", ")``."""
    return repr((stem, name))


def parse_response(body: str) -> tuple[str, str]:
    """``('test_000', 'Paul')`` -> ``("test_000", "Paul")``.

    Read as the tuple it is, so a stem with ", " in it (``Smith, John``) parses right; a body that is not one
    is split the way old web tiers split it.
    """
    if well_formed_response(body):
        stem, name = ast.literal_eval(body)
        return str(stem), str(name)
    stem, _, name = body.strip().strip("()").partition(", ")
    return stem.strip("'\""), name.strip("'\"")


def well_formed_response(body: str, stem: str | None = None) -> bool:
    """Whether ``body`` is a response this contract produces (for ``stem``, when given): a 2-tuple of strings."""
    if len(body) > 4096:  # a stem and a name; anything longer is not an answer
        return False
    try:
        value = ast.literal_eval(body)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return False
    if not (isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, str) for v in value)):
        return False
    return stem is None or value[0] == stem
