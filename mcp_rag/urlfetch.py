"""Fetching a URL for ingestion, safely: http(s) only, public addresses only (checked on every
redirect hop), bounded in size and time, and only content types we can extract."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit, urlunsplit

import anyio
import httpx2

from .errors import AccessDeniedError, InvalidInputError, TooLargeError, UnsupportedSourceError

MAX_REDIRECTS = 5
CONTENT_KINDS = {
    "text/html": "html",
    "application/xhtml+xml": "html",
    "text/plain": "text",
    "text/markdown": "markdown",
    "text/x-markdown": "markdown",
    "application/pdf": "pdf",
}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Fetched:
    url: str
    kind: str
    data: bytes


class UrlPolicy:
    """Which hosts may be fetched. Private, loopback, link-local (cloud metadata), multicast and
    reserved addresses are refused unless the host name or an enclosing network is allowlisted."""

    def __init__(self, allowlist: Sequence[str] = ()) -> None:
        self._hosts: set[str] = set()
        self._networks: list[Network] = []
        for entry in allowlist:
            try:
                self._networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self._hosts.add(entry.lower().rstrip("."))

    def check_url(self, url: str) -> tuple[str, int]:
        if any(ord(char) < 0x20 or ord(char) == 0x7F for char in url):
            raise InvalidInputError(f"the URL contains a control character: {url[:200]!r}")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise InvalidInputError(f"not a valid URL: {url[:200]!r}") from None
        if parts.scheme not in ("http", "https"):
            raise InvalidInputError(f"only http and https URLs can be ingested, not {parts.scheme or 'none'!r}")
        if not parts.hostname:
            raise InvalidInputError(f"the URL has no host: {url[:200]!r}")
        if parts.username or parts.password:
            raise InvalidInputError("URLs with credentials (user:password@) are not accepted")
        return parts.hostname.lower().rstrip("."), port or (443 if parts.scheme == "https" else 80)

    async def check_host(self, host: str, port: int) -> str | None:
        """Resolve ``host`` and check every address; returns the address to connect to (pinned, so that
        a second DNS answer cannot differ from the checked one), or None for an allowlisted host name."""
        if host in self._hosts:
            return None
        try:
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            raise InvalidInputError(f"cannot resolve host {host!r}") from None
        if not infos:
            raise InvalidInputError(f"cannot resolve host {host!r}")
        addresses: list[IPAddress] = []
        for info in infos:
            address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                address = address.ipv4_mapped  # the same socket destination as the IPv4 address
            refusal = self._refusal(address)
            if refusal is not None:
                raise AccessDeniedError(
                    f"refusing to fetch {host!r}: it resolves to {address}, {refusal}; an operator can allow it "
                    "with MCP_RAG_URL_ALLOWLIST"
                )
            addresses.append(address)
        return str(addresses[0])

    def _refusal(self, address: IPAddress) -> str | None:
        """Why ``address`` may not be connected to, or None. The allowlist matches the address that is
        connected to; an IPv6 address that embeds an IPv4 one is judged by the embedded address too."""
        if any(address in net for net in self._networks):
            return None
        if isinstance(address, ipaddress.IPv6Address):
            if address in IPV4_COMPATIBLE or address in SIX_TO_FOUR or address in LOCAL_NAT64:
                return (
                    "a deprecated or local-use IPv6 form that embeds an IPv4 address (IPv4-compatible ::/96, "
                    "6to4 2002::/16, local NAT64 64:ff9b:1::/48) and may reach a non-public address"
                )
            if address in NAT64:
                embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
                if not _public(embedded):
                    return f"a NAT64 address of {embedded}, a non-public address (loopback, private, link-local or reserved)"
        if not _public(address):
            return "a non-public address (loopback, private, link-local or reserved)"
        return None


IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
"""Deprecated (RFC 4291): ``::a.b.c.d``. ``::`` and ``::1`` lie here too and are refused either way."""
SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
"""6to4 (deprecated by RFC 7526): ``2002:AABB:CCDD::`` reaches a.b.c.d through a relay."""
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
"""The well-known NAT64 prefix (RFC 6052): the last 32 bits are the IPv4 address reached."""
LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")
"""Local-use NAT64 (RFC 8215): where the IPv4 address sits depends on the network's configuration."""


def _public(address: IPAddress) -> bool:
    return address.is_global and not address.is_multicast


async def fetch(url: str, policy: UrlPolicy, *, max_bytes: int, timeout: float) -> Fetched:  # noqa: ASYNC109
    """GET ``url`` following up to MAX_REDIRECTS redirects, each hop checked against the policy."""
    try:
        with anyio.fail_after(timeout):
            async with httpx2.AsyncClient(follow_redirects=False, timeout=timeout, trust_env=False) as client:
                current = url
                for _ in range(MAX_REDIRECTS + 1):
                    host, port = policy.check_url(current)
                    pinned = await policy.check_host(host, port)
                    target, headers, extensions = current, {"Accept": ", ".join(CONTENT_KINDS)}, {}
                    if pinned is not None:
                        # Connect to the address that was checked; the URL's host still names the site.
                        parts = urlsplit(current)
                        literal = f"[{pinned}]" if ":" in pinned else pinned
                        target = urlunsplit(parts._replace(netloc=f"{literal}:{port}"))
                        headers["Host"] = parts.netloc
                        if parts.scheme == "https":
                            extensions["sni_hostname"] = host
                    async with client.stream("GET", target, headers=headers, extensions=extensions) as resp:
                        if resp.is_redirect:
                            location = resp.headers.get("location")
                            if not location:
                                raise InvalidInputError(f"{current}: redirect without a Location header")
                            current = urljoin(current, location)
                            continue
                        if resp.status_code >= 400:
                            raise InvalidInputError(f"{current}: the server answered HTTP {resp.status_code}")
                        kind = _kind(resp.headers.get("content-type", ""), current)
                        declared = resp.headers.get("content-length")
                        if declared and declared.isdigit() and int(declared) > max_bytes:
                            raise TooLargeError(f"{current}: {declared} bytes exceeds the limit of {max_bytes} bytes")
                        body = bytearray()
                        async for piece in resp.aiter_bytes():
                            body += piece
                            if len(body) > max_bytes:
                                raise TooLargeError(f"{current}: larger than the limit of {max_bytes} bytes")
                        return Fetched(current, kind, bytes(body))
                raise InvalidInputError(f"{url}: more than {MAX_REDIRECTS} redirects")
    except TimeoutError:
        raise InvalidInputError(f"{url}: no complete answer within {timeout:.0f} seconds") from None
    except (httpx2.HTTPError, httpx2.InvalidURL) as exc:
        raise InvalidInputError(f"{url}: could not fetch ({type(exc).__name__}: {exc})") from None


def _kind(content_type: str, url: str) -> str:
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime in CONTENT_KINDS:
        return CONTENT_KINDS[mime]
    raise UnsupportedSourceError(
        f"{url}: content type {mime or 'unknown'!r} cannot be ingested; supported: {', '.join(sorted(CONTENT_KINDS))}"
    )
