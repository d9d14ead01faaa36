"""``keywords``: the key phrases of a text, with YAKE.

YAKE (PyPI ``yake``) is unsupervised and statistical: it scores candidate phrases from
features of the text itself — casing, position, frequency, spread over sentences, how many
different words surround a term — so it needs no model, no corpus and no download, and works
on one document in any language it has a stop-word list for. A lower score means a more
relevant keyword; results come best first, near-duplicates removed.

Stop-word lists are read once per language and kept; an extractor is built per call (cheap),
so concurrent calls share no mutable state.

Parameters: ``top`` (1..100, default 10), ``language`` (default ``en``; a code YAKE ships a
stop-word list for, see ``LANGUAGES``), ``max_ngram`` (1..5, default 3: longest phrase in
words). Output: ``{"text": "kw1, kw2, …", "keywords": [{"keyword", "score"}]}``.
Limit: ``AISO_KEYWORDS_MAX_CHARS`` (100,000).
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import yake

from aiso.contracts import PayloadType
from aiso.errors import PermanentError
from aiso.sdk import Context, Service
from aiso.services._common import (
    MAX_TEXT_CHARS,
    check_params,
    env_number,
    int_param,
    str_param,
    text_of,
)

__all__ = ["LANGUAGES", "extract", "service"]

service = Service(
    name="keywords",
    input=[PayloadType.TEXT],
    output=PayloadType.TEXT,
    version="1.0.0",
    concurrency=2,
    description="Keyword extraction with YAKE.",
)

MAX_CHARS = int(env_number("AISO_KEYWORDS_MAX_CHARS", MAX_TEXT_CHARS))
PARAMETERS = ("top", "language", "max_ngram")
_LISTS = resources.files("yake.core") / "StopwordsList"
LANGUAGES = frozenset(
    name.removeprefix("stopwords_").removesuffix(".txt")
    for name in (p.name for p in _LISTS.iterdir())
    if name.startswith("stopwords_") and name != "stopwords_noLang.txt"
)
"""Languages YAKE has a stop-word list for (``en``, ``de``, ``fr``, …)."""


@functools.cache
def _stopwords(language: str) -> frozenset[str]:
    text = (_LISTS / f"stopwords_{language}.txt").read_bytes().decode("utf-8", errors="replace")
    return frozenset(text.lower().split("\n"))


@service.on_startup
def load() -> None:
    _stopwords("en")  # the default; other languages load on first use


def extract(
    text: str, *, top: int = 10, language: str = "en", max_ngram: int = 3
) -> list[tuple[str, float]]:
    """``[(keyword, score), …]`` best (lowest score) first."""
    extractor = yake.KeywordExtractor(
        lan=language, n=max_ngram, top=top, stopwords=set(_stopwords(language))
    )
    return [(str(k), float(s)) for k, s in extractor.extract_keywords(text)]


@service.handler
def run(payload: dict[str, Any], params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    check_params(params, PARAMETERS)
    top = int_param(params, "top", 10, 1, 100)
    max_ngram = int_param(params, "max_ngram", 3, 1, 5)
    language = str_param(params, "language", "en").lower()
    if language not in LANGUAGES:
        raise PermanentError(
            f"unsupported language {language!r} (supported: {', '.join(sorted(LANGUAGES))})",
            code="InvalidParameter",
        )
    text = text_of(payload, max_chars=MAX_CHARS)
    found = extract(text, top=top, language=language, max_ngram=max_ngram)
    return {
        "text": ", ".join(keyword for keyword, _ in found),
        "keywords": [{"keyword": keyword, "score": score} for keyword, score in found],
    }
