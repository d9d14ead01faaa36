"""Outbound URL policy: aiso never calls private, loopback or link-local addresses by default.

Client-supplied URLs (``callback_url``, URL payloads) would otherwise let anyone who can submit
a task make the platform call into the cluster network (SSRF). The check resolves the host and
looks at every address, and is repeated right before each call, so a DNS answer that changes
after submission does not get through either.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

__all__ = ["UnsafeURL", "check_url", "check_url_syntax"]


class UnsafeURL(ValueError):
    """The URL is malformed or points somewhere aiso does not call."""


def check_url_syntax(url: str) -> str:
    """The URL's host, if the URL is an absolute http(s) URL; else ``UnsafeURL``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeURL("must be an absolute http:// or https:// URL")
    return parts.hostname


def _private(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


async def check_url(url: str, *, allow_private: bool) -> None:
    """Refuse ``url`` unless every address its host resolves to is public (or allowed)."""
    host = check_url_syntax(url)
    if allow_private:
        return
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise UnsafeURL(f"cannot resolve host {host!r}") from None
    for info in infos:
        address = str(info[4][0])
        if _private(address):
            raise UnsafeURL(
                f"host {host!r} resolves to {address}, a private/loopback/link-local address "
                "(set AISO_ALLOW_PRIVATE_URLS=true to allow)"
            )
