"""Fetching image URLs, only where the operator allowed it (IMAGE_URLS=allow, IMAGE_URL_HOSTS).

A URL in a request is a request to this server to connect somewhere: Infinity fetched any URL (no
size cap, no address check, redirects followed), and vLLM had the same hole (CVE-2025-6242). Here:

- off by default: a URL is a 400 that says how to turn fetching on, and nothing is connected to;
- only `http` and `https`, no user:password@, and the host must match IMAGE_URL_HOSTS (exact
  names, `*.example.com` for its subdomains, IP addresses, or `*`);
- the host's name is resolved once, here; if any of its addresses is not a public one (private,
  loopback, link-local such as the cloud metadata address 169.254.169.254, shared, reserved,
  multicast, and the IPv4 addresses inside IPv6 forms), the URL is refused. The connection goes
  to the address that was checked (TLS still checks the certificate against the host name), so a
  second lookup cannot answer something else (DNS rebinding);
- redirects are followed only to URLs that pass the same checks, at most MAX_REDIRECTS;
- one deadline (IMAGE_URL_TIMEOUT) for the whole fetch, connecting and reading included;
- the body is read as it streams in and abandoned past MAX_IMAGE_BYTES (a Content-Length over it
  is refused before the body is read); no proxy from the environment, no cookies, no compression;
- at most IMAGE_URL_CONCURRENCY fetches at once per worker; the others wait their turn.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import urljoin, urlsplit

from runners.errors import BadRequest, PayloadTooLarge

MAX_REDIRECTS = 3
_REDIRECTS = (301, 302, 303, 307, 308)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
USER_AGENT = "embed-rerank-image-fetch/1"

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def public_address(address: Address) -> bool:
    """A globally routable unicast address, also when an IPv4 address hides inside an IPv6 one."""
    if address.is_multicast or not address.is_global:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        inner = [address.ipv4_mapped, address.sixtofour, *(address.teredo or ())]
        if address in _NAT64:
            inner.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        return all(public_address(v4) for v4 in inner if v4 is not None)
    return True


def host_allowed(host: str, patterns: tuple[str, ...]) -> bool:
    for pattern in patterns:
        if pattern == "*" or host == pattern:
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:]):
            return True
    return False


class ImageFetcher:
    """Fetches image URLs under the rules of the module docstring. `address_allowed` is the address
    rule (tests pass another to reach a server on 127.0.0.1; no setting changes it)."""

    def __init__(self, hosts: tuple[str, ...], timeout_s: float, max_bytes: int, concurrency: int,
                 address_allowed: Callable[[Address], bool] = public_address) -> None:
        self.hosts = hosts
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.concurrency = concurrency
        self.address_allowed = address_allowed
        self._gates: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}
        self._ssl: ssl.SSLContext | None = None

    def _gate(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        gate = self._gates.get(loop)
        if gate is None:
            gate = self._gates[loop] = asyncio.Semaphore(self.concurrency)
        return gate

    async def fetch(self, url: str, where: str) -> bytes:
        """The image's bytes, or a 4xx that names `where` and says why."""
        self._check(url, where)  # refused at once, before waiting for a turn
        async with self._gate():
            try:
                return await asyncio.wait_for(self._fetch(url, where), self.timeout_s)
            except asyncio.TimeoutError:
                raise BadRequest(f"{where}: fetching {_short(url)} took longer than IMAGE_URL_TIMEOUT={self.timeout_s:g}s",
                                 param=where, code="image_url_timeout") from None

    def _check(self, url: str, where: str) -> tuple[str, str, int]:
        """(scheme, host, port) of a URL that may be fetched; else a 400."""
        try:
            parts = urlsplit(url)
            host, port = (parts.hostname or "").rstrip(".").lower(), parts.port
            host = host.encode("idna").decode("ascii") if not host.isascii() else host
        except (ValueError, UnicodeError):
            raise BadRequest(f"{where} is not a valid URL", param=where, code="invalid_image_url") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise BadRequest(f"{where}: only http and https URLs are fetched, not {scheme}:", param=where,
                             code="invalid_image_url")
        if parts.username is not None or parts.password is not None:
            raise BadRequest(f"{where}: URLs with user:password@ are not fetched", param=where, code="invalid_image_url")
        if not host:
            raise BadRequest(f"{where} is a URL without a host", param=where, code="invalid_image_url")
        if not host_allowed(host, self.hosts):
            raise BadRequest(f"{where}: the host {host!r} is not in IMAGE_URL_HOSTS: send the image as a data URI, or "
                             "ask the operator to add the host", param=where, code="image_url_host_not_allowed")
        return scheme, host, port or (443 if scheme == "https" else 80)

    async def _resolve(self, host: str, port: int, where: str) -> Address:
        """The address to connect to: every address of the host must pass `address_allowed`."""
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError:
                raise BadRequest(f"{where}: the host {host!r} does not resolve", param=where,
                                 code="image_url_fetch_failed") from None
            addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
        if not addresses or not all(self.address_allowed(a) for a in addresses):
            raise BadRequest(f"{where}: the host {host!r} has an address that is not public (private, loopback, "
                             "link-local or reserved): it is not fetched", param=where, code="image_url_address_refused")
        return addresses[0]

    async def _fetch(self, url: str, where: str) -> bytes:
        import httpx

        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        async with httpx.AsyncClient(trust_env=False, follow_redirects=False, verify=self._ssl,
                                     timeout=httpx.Timeout(self.timeout_s)) as client:
            for _ in range(MAX_REDIRECTS + 1):
                scheme, host, port = self._check(url, where)
                address = await self._resolve(host, port, where)
                parts = urlsplit(url)
                literal = f"[{address}]" if address.version == 6 else str(address)
                pinned = parts._replace(scheme=scheme, netloc=f"{literal}:{port}").geturl()
                default_port = port == (443 if scheme == "https" else 80)
                headers = {"Host": host if default_port else f"{host}:{port}", "User-Agent": USER_AGENT,
                           "Accept": "image/png, image/jpeg, image/webp, image/gif", "Accept-Encoding": "identity"}
                extensions = {"sni_hostname": host} if scheme == "https" else {}
                try:
                    async with client.stream("GET", pinned, headers=headers, extensions=extensions) as response:
                        if response.status_code in _REDIRECTS and response.headers.get("location"):
                            url = urljoin(url, response.headers["location"])
                            continue
                        if response.status_code != 200:
                            raise BadRequest(f"{where}: {_short(url)} answered HTTP {response.status_code}", param=where,
                                             code="image_url_fetch_failed")
                        return await self._read(response, where)
                except (httpx.HTTPError, httpx.InvalidURL, ValueError, UnicodeError) as exc:
                    raise BadRequest(f"{where}: fetching {_short(url)} failed ({type(exc).__name__})", param=where,
                                     code="image_url_fetch_failed") from None
        raise BadRequest(f"{where}: {_short(url)} redirects more than {MAX_REDIRECTS} times", param=where,
                         code="image_url_fetch_failed")

    async def _read(self, response: Any, where: str) -> bytes:
        length = response.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            raise self._too_large(where)
        chunks, size = [], 0
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if size > self.max_bytes:
                raise self._too_large(where)
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, where: str) -> PayloadTooLarge:
        return PayloadTooLarge(f"{where}: the image is over MAX_IMAGE_BYTES={self.max_bytes} bytes", param=where,
                               code="image_too_large")


def _short(url: str) -> str:
    return url if len(url) <= 120 else url[:117] + "..."
