"""``tts``: text to speech with espeak-ng, offline on CPU.

espeak-ng (Debian package ``espeak-ng``) is a formant synthesiser: robotic, but small, fast,
with a hundred languages and no model to download. The binary runs as a subprocess
(``espeak-ng --stdout -v <voice> -s <rate>``) with the text on standard input — never on the
command line, where a text starting with ``-`` would read as an option and a long one would
hit the argument limit. The handler is a plain ``def``, so the runtime's thread pool waits
for the process and the event loop stays free.

Parameters: ``voice`` (default ``en-us``) — a language code or voice file from ``espeak-ng
--voices``, optionally with a variant from ``--voices=variant`` (``en-us+f3``); the lists are
read once at startup, because espeak-ng silently produces nothing for an unknown voice.
``rate`` in words per minute, 80..450 (default 175, espeak-ng's own).

Output: ``{"audio_b64", "mime": "audio/wav", "duration"}``. espeak-ng streams its WAV with
placeholder sizes in the header (it does not know the length when it starts), which some
readers take literally; the samples are re-wrapped in a correct header. Limit:
``AISO_TTS_MAX_CHARS`` characters of text (5000, about five minutes of speech).
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import struct
import subprocess
import wave
from typing import Any

from aiso.contracts import PayloadType
from aiso.errors import PermanentError
from aiso.sdk import Context, Service
from aiso.services._common import check_params, env_number, int_param, str_param, text_of

__all__ = ["list_voices", "service", "synthesize"]

service = Service(
    name="tts",
    input=[PayloadType.TEXT],
    output=PayloadType.AUDIO,
    version="1.0.0",
    concurrency=2,
    description="Text to speech with espeak-ng (WAV).",
)

MAX_CHARS = int(env_number("AISO_TTS_MAX_CHARS", 5000))
TIMEOUT = env_number("AISO_TTS_TIMEOUT", 120)
MIN_RATE, MAX_RATE, DEFAULT_RATE = 80, 450, 175
PARAMETERS = ("voice", "rate")

_voices: frozenset[str] = frozenset()
_variants: frozenset[str] = frozenset()


def _espeak() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise FileNotFoundError(
            "espeak-ng is not installed (Debian/Ubuntu: apt-get install espeak-ng)"
        )
    return path


def list_voices() -> tuple[frozenset[str], frozenset[str]]:
    """(voices, variants) that ``-v`` accepts: language codes (``en-gb``, and the broader
    ``en`` listed under "Other Languages"), voice files (``gmw/en-US``), and variant names
    (the part after ``+``)."""

    def lines(*args: str) -> list[str]:
        out = subprocess.run([_espeak(), *args], capture_output=True, text=True, check=True)
        return out.stdout.splitlines()[1:]  # below the header

    voices: set[str] = set()
    for line in lines("--voices"):
        cells = line.split()
        if len(cells) > 4:
            voices.update((cells[1], cells[4]))
            voices.update(re.findall(r"\((\S+) \d+\)", line))
    variants = {
        cells[4].removeprefix("!v/")
        for cells in map(str.split, lines("--voices=variant"))
        if len(cells) > 4
    }
    return frozenset(voices), frozenset(variants)


@service.on_startup
def load() -> None:
    global _voices, _variants
    _voices, _variants = list_voices()


def _check_voice(voice: str) -> str:
    base, _, variant = voice.partition("+")
    if base not in _voices or (variant and variant not in _variants):
        raise PermanentError(
            f"unknown voice {voice!r}: use a language or voice from `espeak-ng --voices` "
            "(e.g. en-us, en-gb, de, fr), optionally +variant (e.g. en-us+f3)",
            code="InvalidParameter",
        )
    return voice


def synthesize(text: str, *, voice: str = "en-us", rate: int = DEFAULT_RATE) -> bytes:
    """WAV bytes (mono, 16-bit, 22,050 Hz) of ``text`` spoken by espeak-ng."""
    argv = [_espeak(), "--stdout", "-b", "1", "-v", voice, "-s", str(rate)]  # -b 1: UTF-8 in
    try:
        done = subprocess.run(argv, input=text.encode(), capture_output=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        raise PermanentError(f"espeak-ng took longer than {TIMEOUT:g} s", code="Timeout") from None
    if done.returncode != 0 or not done.stdout:
        reason = done.stderr.decode(errors="replace").strip() or f"exit code {done.returncode}"
        raise RuntimeError(f"espeak-ng failed: {reason}")
    return _rewrap(done.stdout)


def _rewrap(stream: bytes) -> bytes:
    """A WAV with correct chunk sizes from espeak-ng's streamed one (sizes 0x7fffffff)."""
    channels = rate = width = 0
    pos = 12
    while pos + 8 <= len(stream):
        chunk, size = stream[pos : pos + 4], struct.unpack("<I", stream[pos + 4 : pos + 8])[0]
        if chunk == b"fmt ":
            channels, rate, _, _, bits = struct.unpack("<HIIHH", stream[pos + 10 : pos + 24])
            width = bits // 8
        elif chunk == b"data":
            pcm = stream[pos + 8 :]
            pcm = pcm[: len(pcm) - len(pcm) % (channels * width)]
            out = io.BytesIO()
            with wave.open(out, "wb") as w:
                w.setnchannels(channels)
                w.setsampwidth(width)
                w.setframerate(rate)
                w.writeframes(pcm)
            return out.getvalue()
        pos += 8 + size + size % 2
    raise RuntimeError("espeak-ng wrote no WAV data")


def wav_duration(data: bytes) -> float:
    with wave.open(io.BytesIO(data), "rb") as w:
        return w.getnframes() / w.getframerate()


@service.handler
def run(payload: dict[str, Any], params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    check_params(params, PARAMETERS)
    voice = _check_voice(str_param(params, "voice", "en-us"))
    rate = int_param(params, "rate", DEFAULT_RATE, MIN_RATE, MAX_RATE)
    text = text_of(payload, max_chars=MAX_CHARS)
    audio = synthesize(text, voice=voice, rate=rate)
    return {
        "audio_b64": base64.b64encode(audio).decode("ascii"),
        "mime": "audio/wav",
        "duration": round(wav_duration(audio), 3),
    }
