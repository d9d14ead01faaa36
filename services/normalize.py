"""``normalize``: one canonical spelling of a text before anything else reads it.

Unicode NFKC folds compatibility forms (full-width letters, ligatures, non-breaking spaces,
superscripts) into their plain equivalents, then every run of whitespace becomes one space and
the ends are stripped. Later steps — counting, matching, embedding — then see the same text
however it was typed or transcribed. Other payload fields pass through unchanged.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from aiso.contracts import PayloadType
from aiso.errors import PermanentError
from aiso.sdk import Context, Service

__all__ = ["normalize", "service"]

service = Service(
    name="normalize",
    input=[PayloadType.TEXT],
    output=PayloadType.TEXT,
    version="1.0.0",
    concurrency=8,
    description="Unicode NFKC and whitespace normalisation of text.",
)

_WHITESPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip()


@service.handler
def run(payload: dict[str, Any], params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    # A plain def: on a large text this is CPU work, which the runtime keeps off the loop.
    text = normalize(payload["text"])
    if not text:
        raise PermanentError("empty text")
    return {**payload, "text": text}
