"""Audio input for the speech services: where the bytes come from, what they are, and PCM.

Bytes come inline (``audio_b64``) or from ``url``, fetched with httpx: http(s) only, a
timeout, and a byte limit counted while streaming, so a missing or lying ``Content-Length``
cannot make a replica buffer more. The host must pass ``aiso.netguard`` — the gateway's own
check, repeated here right before the call so a DNS answer that changed since submission does
not reach the cluster's inside — unless ``AISO_ALLOW_PRIVATE_URLS`` is set. Redirects are
followed by hand, up to three, each target checked the same way.

The format is read from the bytes (magic numbers), not trusted from ``mime``: WAV, MP3, OGG
(Vorbis, Opus) and FLAC. A declared ``mime`` outside those is refused up front. Decoding uses
PyAV, the FFmpeg bindings faster-whisper ships, and follows
``faster_whisper.audio.decode_audio`` step for step (same resampler, same frame grouping), so
the service transcribes exactly the samples faster-whisper would read from the file. Unlike
it, decoding stops once the audio passes the duration limit: a small file that decodes to
hours cannot exhaust memory.

Failures are ``PermanentError`` (corrupt, unsupported, too large, too long, 4xx from the URL)
except transient fetch failures (timeouts, connection errors, 408/429/5xx), which are
``RetryableError``.
"""

from __future__ import annotations

import base64
import binascii
import gc
import io
from collections.abc import Iterator
from typing import Any
from urllib.parse import urljoin

import av
import httpx
import numpy as np
import numpy.typing as npt

from aiso.errors import PermanentError, RetryableError
from aiso.netguard import UnsafeURL, check_url
from aiso.settings import get_settings

__all__ = ["FORMATS", "SAMPLE_RATE", "decode", "fetch", "read_audio", "sniff"]

SAMPLE_RATE = 16_000
"""Whisper's input rate; every decoded signal is mono float32 at this rate."""

FORMATS: dict[str, tuple[str, ...]] = {
    "wav": ("audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave"),
    "mp3": ("audio/mpeg", "audio/mp3", "audio/mpeg3", "audio/x-mpeg-3"),
    "ogg": ("audio/ogg", "audio/opus", "audio/vorbis", "application/ogg"),
    "flac": ("audio/flac", "audio/x-flac"),
}
"""Container → the MIME types that name it."""

_MIME_FORMAT = {mime: fmt for fmt, mimes in FORMATS.items() for mime in mimes}
_SUPPORTED = "WAV, MP3, OGG or FLAC"
_MAX_REDIRECTS = 3


def sniff(data: bytes) -> str | None:
    """The container of ``data`` from its first bytes, or None when it is none we decode."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "wav"
    if data[:4] == b"fLaC":
        return "flac"
    if data[:4] == b"OggS":
        return "ogg"
    # An ID3 tag, or an MPEG audio frame sync (11 bits set) with layer III.
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE6 == 0xE2):
        return "mp3"
    return None


async def read_audio(
    payload: dict[str, Any], *, max_bytes: int, timeout: float
) -> tuple[bytes, str]:
    """The audio bytes of an audio payload and their container (``wav``, ``mp3``, …)."""
    mime = str(payload.get("mime") or "").split(";")[0].strip().lower()
    if mime and mime not in _MIME_FORMAT:
        raise PermanentError(
            f"unsupported audio format '{mime}': send {_SUPPORTED} "
            f"({', '.join(m for mimes in FORMATS.values() for m in mimes[:1])})",
            code="UnsupportedFormat",
        )
    if payload.get("audio_b64") is not None:
        encoded = str(payload["audio_b64"])
        if len(encoded) * 3 // 4 > max_bytes:
            raise _too_large(len(encoded) * 3 // 4, max_bytes)
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise PermanentError("audio_b64 is not valid base64", code="InvalidAudio") from None
    else:
        data = await fetch(str(payload["url"]), max_bytes=max_bytes, timeout=timeout)
    if not data:
        raise PermanentError("the audio is empty (0 bytes)", code="InvalidAudio")
    fmt = sniff(data)
    if fmt is None:
        declared = f" although declared as {mime}" if mime else ""
        raise PermanentError(
            f"corrupt or unsupported audio: the data is not {_SUPPORTED}{declared}",
            code="CorruptAudio",
        )
    return data, fmt


def _too_large(size: int, limit: int) -> PermanentError:
    return PermanentError(
        f"audio too large: {size} bytes or more, the limit is {limit} bytes",
        code="AudioTooLarge",
    )


async def fetch(url: str, *, max_bytes: int, timeout: float) -> bytes:
    """GET ``url`` into memory, at most ``max_bytes``, within ``timeout`` seconds per step."""
    allow_private = get_settings().allow_private_urls
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
        for _ in range(_MAX_REDIRECTS + 1):
            try:
                await check_url(url, allow_private=allow_private)
            except UnsafeURL as exc:
                raise PermanentError(f"audio url refused: {exc}", code="InvalidUrl") from None
            try:
                async with client.stream("GET", url) as response:
                    if response.is_redirect and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    _check_status(response)
                    declared = int(response.headers.get("content-length") or 0)
                    if declared > max_bytes:
                        raise _too_large(declared, max_bytes)
                    buffer = bytearray()
                    async for chunk in response.aiter_bytes():
                        buffer += chunk
                        if len(buffer) > max_bytes:
                            raise _too_large(len(buffer), max_bytes)
                    return bytes(buffer)
            except httpx.TransportError as exc:
                raise RetryableError(
                    f"fetching the audio url failed: {type(exc).__name__}: {exc}",
                    code="FetchFailed",
                ) from None
    raise PermanentError(
        f"more than {_MAX_REDIRECTS} redirects from the audio url", code="InvalidUrl"
    )


def _check_status(response: httpx.Response) -> None:
    status = response.status_code
    if status < 400 and not response.is_redirect:
        return
    message = f"fetching the audio url answered HTTP {status}"
    if status in (408, 429) or status >= 500:
        raise RetryableError(message, code="FetchFailed")
    raise PermanentError(message, code="FetchFailed")


def decode(data: bytes, *, max_seconds: float) -> npt.NDArray[np.float32]:
    """Mono float32 PCM at 16 kHz, as ``faster_whisper.audio.decode_audio`` returns it."""
    max_samples = int(max_seconds * SAMPLE_RATE)
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    raw = io.BytesIO()
    samples = 0
    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise PermanentError("the file has no audio stream", code="CorruptAudio")
            # The header's duration is an estimate for some files (VBR MP3 without a Xing
            # header): only refuse before decoding when it is far over; decoding counts exactly.
            declared = (container.duration or 0) / av.time_base
            if declared > max_seconds * 1.1 + 1:
                raise _too_long(declared, max_seconds)
            for frame in _resampled(_grouped(_valid(container.decode(audio=0))), resampler):
                array = frame.to_ndarray()
                raw.write(array.tobytes())
                samples += array.size
                if samples > max_samples:
                    raise _too_long(samples / SAMPLE_RATE, max_seconds)
    except av.FFmpegError as exc:
        raise PermanentError(
            f"corrupt audio: cannot decode it ({exc.strerror or type(exc).__name__})",
            code="CorruptAudio",
        ) from None
    finally:
        # PyAV's resampler holds native buffers until a collection (faster-whisper #390).
        del resampler
        gc.collect()
    if samples == 0:
        raise PermanentError("corrupt audio: no samples could be decoded", code="CorruptAudio")
    pcm = np.frombuffer(raw.getbuffer(), dtype=np.int16)
    return pcm.astype(np.float32) / 32768.0


def _too_long(seconds: float, limit: float) -> PermanentError:
    return PermanentError(
        f"audio too long: {seconds:.0f} s or more, the limit is {limit:.0f} s",
        code="AudioTooLong",
    )


def _valid(frames: Iterator[av.AudioFrame]) -> Iterator[av.AudioFrame]:
    """Skip frames FFmpeg reports as invalid, as faster-whisper does (a damaged frame in the
    middle of a long file loses a few milliseconds, not the file)."""
    while True:
        try:
            yield next(frames)
        except StopIteration:
            return
        except av.InvalidDataError:
            continue


def _grouped(frames: Iterator[av.AudioFrame], size: int = 500_000) -> Iterator[av.AudioFrame]:
    fifo = av.AudioFifo()
    for frame in frames:
        frame.pts = None  # ignore timestamp checks, as faster-whisper does
        fifo.write(frame)
        if fifo.samples >= size:
            chunk = fifo.read()
            if chunk is not None:
                yield chunk
    if fifo.samples > 0:
        chunk = fifo.read()
        if chunk is not None:
            yield chunk


def _resampled(
    frames: Iterator[av.AudioFrame], resampler: av.AudioResampler
) -> Iterator[av.AudioFrame]:
    for frame in frames:
        yield from resampler.resample(frame)
    yield from resampler.resample(None)  # flush
