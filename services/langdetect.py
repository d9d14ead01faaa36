"""``langdetect``: which language a text is written in.

Uses PyPI ``langdetect``, a port of Google's language-detection: character n-gram profiles
of 55 languages shipped inside the package, a naive Bayes estimate over n-grams sampled from
the text. The sampling is random, so the same text could get different answers on two calls;
a fixed seed makes every answer reproducible. The profiles load once at startup into a
private ``DetectorFactory`` (the library's global one is created lazily and not
thread-safe on first use); each call builds its own ``Detector`` with its own random
generator, so concurrent calls do not disturb each other.

Short texts are guesses: a single word can come out as any language sharing its letters —
``confidence`` says how sure the detector is and ``candidates`` lists the alternatives.

Output: ``{"text", "language", "confidence", "candidates": [{"language", "probability"}]}``
(the input text passes through for the next step). Limit: ``AISO_LANGDETECT_MAX_CHARS``
(100,000); the detector itself reads at most the first 10,000 characters.
"""

from __future__ import annotations

from typing import Any

from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory
from langdetect.lang_detect_exception import LangDetectException

from aiso.contracts import PayloadType
from aiso.errors import PermanentError
from aiso.sdk import Context, Service
from aiso.services._common import MAX_TEXT_CHARS, check_params, env_number, text_of

__all__ = ["SEED", "detect", "service"]

service = Service(
    name="langdetect",
    input=[PayloadType.TEXT],
    output=PayloadType.TEXT,
    version="1.0.0",
    concurrency=4,
    description="Language identification with langdetect (55 languages, fixed seed).",
)

MAX_CHARS = int(env_number("AISO_LANGDETECT_MAX_CHARS", MAX_TEXT_CHARS))
SEED = 0

_factory: DetectorFactory | None = None


@service.on_startup
def load() -> None:
    global _factory
    factory = DetectorFactory()
    factory.load_profile(PROFILES_DIRECTORY)
    factory.set_seed(SEED)
    _factory = factory


def detect(text: str) -> list[tuple[str, float]]:
    """``[(language, probability), …]``, most probable first."""
    if _factory is None:
        raise RuntimeError("language profiles are not loaded (the startup hook has not run)")
    detector = _factory.create()
    detector.append(text)
    try:
        found = detector.get_probabilities()
    except LangDetectException:
        raise PermanentError(
            "no language features in the text: it has no letters to identify a language from",
            code="NoLanguage",
        ) from None
    return [(str(lang.lang), round(float(lang.prob), 4)) for lang in found]


@service.handler
def run(payload: dict[str, Any], params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    check_params(params, ())
    text = text_of(payload, max_chars=MAX_CHARS)
    candidates = detect(text)
    language, confidence = candidates[0]
    return {
        "text": text,
        "language": language,
        "confidence": confidence,
        "candidates": [{"language": lang, "probability": p} for lang, p in candidates],
    }
