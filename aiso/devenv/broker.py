"""Reach — and on a laptop, start — the RabbitMQ broker that ``aiso dev`` needs.

``aiso dev`` should work from a fresh checkout: when nothing listens at the AMQP URL and the
URL points at this machine, an installed RabbitMQ is started detached, so it keeps running
like a system service and the next ``aiso dev`` finds it up. When none is installed the user
gets the command that installs one instead of a connection error.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import aio_pika
from yarl import URL

from aiso import topology

__all__ = [
    "BrokerDown",
    "BrokerError",
    "check",
    "declare_topology",
    "find_rabbitmq_server",
    "install_hint",
    "is_local",
    "misdirected",
    "redact",
    "start_rabbitmq",
]

_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


class BrokerError(Exception):
    """The broker cannot be used; the message is one line a user can act on."""


class BrokerDown(BrokerError):
    """Nothing listens at the broker's address (as opposed to a broker refusing us)."""


def redact(url: str) -> str:
    """``url`` with its password hidden, for messages."""
    parsed = URL(url)
    return str(parsed.with_password("***")) if parsed.password else url


def is_local(url: str) -> bool:
    return (URL(url).host or "") in _LOCAL_HOSTS


def _address(url: str) -> tuple[str, int]:
    parsed = URL(url)
    default = 5671 if parsed.scheme == "amqps" else 5672
    return parsed.host or "127.0.0.1", parsed.port or default


def find_rabbitmq_server(path: str | None = None) -> str | None:
    """The ``rabbitmq-server`` executable: on ``PATH``, or in the ``sbin`` sibling of a ``bin``
    directory on it (Debian installs it in /usr/sbin, which a normal user's PATH often lacks)."""
    dirs = (path if path is not None else os.environ.get("PATH", "")).split(os.pathsep)
    sbins = [str(Path(d).with_name("sbin")) for d in dirs if d and Path(d).name == "bin"]
    return shutil.which("rabbitmq-server", path=os.pathsep.join([*dirs, *sbins]))


def install_hint(url: str) -> str:
    return (
        f"no RabbitMQ answers at {redact(url)} and none is installed on this machine.\n"
        "Get one of:\n"
        "  Debian/Ubuntu:  sudo apt-get install -y rabbitmq-server\n"
        "  macOS:          brew install rabbitmq\n"
        "  elsewhere:      point AISO_AMQP_URL at a running broker, e.g.\n"
        "                  export AISO_AMQP_URL=amqp://user:password@broker-host:5672/\n"
        "then run `aiso dev` again."
    )


def _listening(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


async def check(url: str, connect_seconds: float = 5.0) -> None:
    """Connect once and disconnect. ``BrokerDown`` when nothing listens, ``BrokerError`` when
    something listens but will not let us in (credentials, vhost, not AMQP)."""
    host, port = _address(url)
    if not await asyncio.to_thread(_listening, host, port, min(connect_seconds, 2.0)):
        raise BrokerDown(
            f"cannot reach RabbitMQ at {redact(url)}: nothing listens at {host}:{port}"
        )
    try:
        connection = await aio_pika.connect(url, timeout=connect_seconds)
    except Exception as exc:  # aiormq raises many unrelated types; all mean "cannot use it"
        reason = str(exc) or type(exc).__name__
        if "Connection.OpenOk" in reason:
            # Closed while opening the vhost; aiormq drops the broker's reason text.
            vhost = URL(url).path.lstrip("/") or "/"
            reason = (
                f"no access to the virtual host {vhost!r} (create it with "
                f"`rabbitmqctl add_vhost {vhost}` and grant the user permissions)"
            )
        raise BrokerError(f"RabbitMQ at {redact(url)} refused the connection: {reason}") from None
    await connection.close()


def misdirected(url: str) -> str | None:
    """Why starting a broker for ``url`` would be wrong when one already listens on the
    default port of this machine: RabbitMQ runs one node per host by default, so a second
    would not start, and the URL's port is more likely a typo."""
    host, port = _address(url)
    default = _address(str(URL(url).with_port(None)))[1]
    if port == default or not _listening(host, default, 1.0):
        return None
    return (
        f"nothing listens at {host}:{port}, but a broker does at {host}:{default}; "
        "fix the port in AISO_AMQP_URL"
    )


async def start_rabbitmq(server: str, url: str, up_within: float = 60.0) -> None:
    """Start ``server`` detached on the URL's loopback address and port, and wait until it
    accepts AMQP connections. Root is needed for the packaged server: ``sudo -n`` is used
    when we are not root, so a password prompt never hangs ``aiso dev``."""
    host, port = _address(url)
    settings = {
        "RABBITMQ_NODE_IP_ADDRESS": "::1" if host == "::1" else "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(port),
    }
    if os.geteuid() == 0:
        argv, env = [server, "-detached"], {**os.environ, **settings}
    else:
        assignments = [f"{k}={v}" for k, v in settings.items()]
        argv, env = ["sudo", "-n", "env", *assignments, server, "-detached"], dict(os.environ)
    # Output goes to a file, not a pipe: a detached node that kept the pipe open would
    # leave us waiting for an end of file that never comes.
    with tempfile.TemporaryFile() as log:
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log
            )
        except FileNotFoundError as exc:
            raise BrokerError(f"cannot run {exc.filename}: not found") from None
        code = await process.wait()
        log.seek(0)
        lines = log.read().decode(errors="replace").strip().splitlines()
    if code != 0:
        last = lines[-1] if lines else f"exit code {code}"
        if "password" in last:
            last = f"sudo needs a password; start it yourself: sudo {server} -detached"
        raise BrokerError(f"starting RabbitMQ failed: {last}")
    deadline = time.monotonic() + up_within
    reason = "it did not open its port"
    while time.monotonic() < deadline:
        try:
            await check(url)
            return
        except BrokerError as exc:
            reason = str(exc)
        await asyncio.sleep(0.5)
    raise BrokerError(
        f"RabbitMQ did not come up within {up_within:g}s ({reason}); "
        "see its logs in /var/log/rabbitmq/"
    )


async def declare_topology(url: str, services: Iterable[str]) -> None:
    """Declare the core exchanges and queues, and each service's queues (idempotent)."""
    await check(url)
    connection = await aio_pika.connect(url, timeout=10)
    try:
        channel = await connection.channel()
        await topology.declare_core(channel)
        for name in services:
            await topology.declare_service(channel, name)
    finally:
        await connection.close()
