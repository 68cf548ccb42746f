"""Assertions the tests share."""

from __future__ import annotations


def one_sentence(message: str, *secrets: str) -> bool:
    """A message written for the user: one line, one sentence ending in a full stop, naming none of `secrets`."""
    body = message.replace("e.g. ", "eg ").replace("i.e. ", "ie ")
    return "\n" not in message and message.endswith(".") and ". " not in body and not any(s in message for s in secrets)
