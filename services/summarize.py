"""``summarize``: an extractive summary — the text's most central sentences, in their order.

Extractive, so the summary never says anything the text did not: each kept sentence is quoted
as written, and the sentences stay in their original order so the summary still reads as the
text did. Ranking is TextRank over TF-IDF: each sentence is a TF-IDF vector of its content
words (lower-cased, English stop words dropped, IDF smoothed), sentences are linked by cosine
similarity, and PageRank on that graph (damping 0.85) scores a sentence high when it shares
vocabulary with many other well-scored sentences — the ones the rest of the text is about.
Ties go to the earlier sentence, so the result is deterministic. Plain Python, no model and no
download; the similarity graph is built from an inverted index, so a sentence is only ever
compared with the sentences it shares a word with.

Sentences end at ``. ! ? …`` followed by a space; common abbreviations (``Dr.``, ``e.g.``),
single initials and a following lower-case word do not end one.

Parameter: ``sentences`` (1..50, default 3). Output: ``{"text", "sentences": [...]}``.
Limit: ``AISO_SUMMARIZE_MAX_CHARS`` (100,000).
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from typing import Any

from aiso.contracts import PayloadType
from aiso.sdk import Context, Service
from aiso.services._common import MAX_TEXT_CHARS, check_params, env_number, int_param, text_of

__all__ = ["STOPWORDS", "content_words", "service", "split_sentences", "summarize"]

service = Service(
    name="summarize",
    input=[PayloadType.TEXT],
    output=PayloadType.TEXT,
    version="1.0.0",
    concurrency=2,
    description="Extractive summary: TextRank over TF-IDF sentence similarity.",
)

MAX_CHARS = int(env_number("AISO_SUMMARIZE_MAX_CHARS", MAX_TEXT_CHARS))
PARAMETERS = ("sentences",)

_STOPWORDS = """a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself
    yourselves also us may might must shall let get got s t d ll m re ve"""
STOPWORDS = frozenset(_STOPWORDS.split())
"""English function words: they link every sentence to every other and say nothing."""

_ABBREVIATIONS = frozenset(
    ("mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "fig", "approx")
)
_BOUNDARY = re.compile("(?:(?<=[.!?\u2026])|(?<=[.!?\u2026][\"'\u201d\u2019)\\]]))\\s+")
_WORD = re.compile("[^\\W_]+(?:['\u2019][^\\W_]+)*")


def split_sentences(text: str) -> list[str]:
    sentences: list[str] = []
    for piece in _BOUNDARY.split(text.strip()):
        piece = piece.strip()
        if not piece:
            continue
        if sentences and _continues(sentences[-1], piece):
            sentences[-1] = f"{sentences[-1]} {piece}"
        else:
            sentences.append(piece)
    return sentences


def _continues(previous: str, piece: str) -> bool:
    """Whether the break before ``piece`` was no sentence end after all."""
    last = previous.rsplit(None, 1)[-1].rstrip(".").lower()
    return last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha()) or piece[0].islower()


def content_words(sentence: str) -> list[str]:
    return [w for w in _WORD.findall(sentence.lower()) if w not in STOPWORDS]


def _scores(sentences: list[str]) -> list[float]:
    n = len(sentences)
    bags = [Counter(content_words(s)) for s in sentences]
    df = Counter(word for bag in bags for word in bag)
    vectors: list[dict[str, float]] = []
    for bag in bags:
        total = sum(bag.values()) or 1
        vec = {w: c / total * (math.log((1 + n) / (1 + df[w])) + 1) for w, c in bag.items()}
        norm = math.sqrt(sum(v * v for v in vec.values())) or 1.0
        vectors.append({w: v / norm for w, v in vec.items()})
    postings: dict[str, list[int]] = defaultdict(list)
    for i, vec in enumerate(vectors):
        for word in vec:
            postings[word].append(i)
    weights: list[dict[int, float]] = [defaultdict(float) for _ in range(n)]
    for word, ids in postings.items():
        for a in ids:
            for b in ids:
                if a != b:
                    weights[a][b] += vectors[a][word] * vectors[b][word]
    out_sum = [sum(w.values()) for w in weights]
    score = [1.0 / n] * n
    for _ in range(100):
        new = [(1 - 0.85) / n] * n
        for a in range(n):
            if out_sum[a] == 0:
                continue
            share = 0.85 * score[a] / out_sum[a]
            for b, w in weights[a].items():
                new[b] += share * w
        # Sentences sharing no word with any other hand their weight to all equally.
        dangling = 0.85 * sum(score[a] for a in range(n) if out_sum[a] == 0) / n
        new = [v + dangling for v in new]
        done = sum(abs(x - y) for x, y in zip(new, score, strict=True)) < 1e-9
        score = new
        if done:
            break
    return score


def summarize(text: str, count: int = 3) -> list[str]:
    """The ``count`` top-ranked sentences of ``text`` in their original order."""
    sentences = split_sentences(text)
    if len(sentences) <= count:
        return sentences
    score = _scores(sentences)
    best = sorted(range(len(sentences)), key=lambda i: (-score[i], i))[:count]
    return [sentences[i] for i in sorted(best)]


@service.handler
def run(payload: dict[str, Any], params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    check_params(params, PARAMETERS)
    count = int_param(params, "sentences", 3, 1, 50)
    chosen = summarize(text_of(payload, max_chars=MAX_CHARS), count)
    return {"text": " ".join(chosen), "sentences": chosen}
