"""``stats``: count the words, sentences and characters of a text.

Words are runs of Unicode word characters (``\\w+``), so "naïve" and "日本語" count as
words and punctuation never does. Sentences are the non-blank segments between runs of
terminal punctuation (``. ! ? …``); a text without any counts as one sentence, and "Wait...
what?!" as two. Characters are code points of the text as given — run ``normalize`` first
for counts that do not depend on spacing. Other payload fields pass through unchanged.
"""

from __future__ import annotations

import re
from typing import Any

from aiso.contracts import PayloadType
from aiso.sdk import Context, Service

__all__ = ["count", "service"]

service = Service(
    name="stats",
    input=[PayloadType.TEXT],
    output=PayloadType.TEXT,
    version="1.0.0",
    concurrency=8,
    description="Counts the words, sentences and characters of a text.",
)

_WORD = re.compile(r"\w+")
_SENTENCE_END = re.compile(r"[.!?…]+")


def count(text: str) -> dict[str, int]:
    return {
        "words": len(_WORD.findall(text)),
        "sentences": sum(1 for part in _SENTENCE_END.split(text) if part.strip()),
        "characters": len(text),
    }


@service.handler
def run(payload: dict[str, Any], params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    return {**payload, **count(payload["text"])}
