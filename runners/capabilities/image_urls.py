"""Fetching image URLs, only where the operator allowed it (IMAGE_URLS=allow, IMAGE_URL_HOSTS).

A URL in a request is a request to this server to connect somewhere: Infinity fetched any URL (no
size cap, no address check, redirects followed), and vLLM had the same hole (CVE-2025-6242). Here:

- off by default: a URL is a 400 that says how to turn fetching on, and nothing is connected to;
- only `http` and `https`, no user:password@, and the host must match IMAGE_URL_HOSTS (exact
  names, `*.example.com` for its subdomains, IP addresses, or `*`), on port 80 or 443 unless the
  entry names its port (`images.example.com:8080`);
- the host's name is resolved once, here, in a few lookup threads of its own (LOOKUP_THREADS, never
  the shared pool; a lookup that does not answer by the deadline fails the fetch, and when every
  lookup thread is stuck a fetch fails at once instead of queueing); if any of its addresses is
  not a public one (private, loopback, link-local such as the cloud metadata address
  169.254.169.254, shared, reserved, multicast, and the IPv4 address inside IPv4-mapped,
  IPv4-compatible, SIIT, NAT64, 6to4 and Teredo addresses), the URL is refused. The connection
  goes to the address that was checked (TLS still checks the certificate against the host name),
  so a second lookup cannot answer something else (DNS rebinding);
- redirects are followed only to URLs that pass the same checks, at most MAX_REDIRECTS;
- one deadline (IMAGE_URL_TIMEOUT) for the whole fetch, lookup, connecting and reading included;
- past the host-list check, every failure is the same 400 (`image_url_fetch_failed`, one message):
  a host that does not resolve, a non-public address, a refused or reset connection, TLS, the
  deadline, a status other than 200, a refused redirect. Telling them apart would make the server
  a port scanner of the hosts it may reach; the reason is logged at INFO for the operator;
- the body is read as it streams in and abandoned past MAX_IMAGE_BYTES (a Content-Length over it
  is refused before the body is read); no proxy from the environment, no cookies, no compression;
- at most IMAGE_URL_CONCURRENCY fetches at once per worker, and a fetch keeps its turn until its
  bytes have been used (decoded), so at most that many raw images are held per worker.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

from runners.errors import BadRequest, PayloadTooLarge

MAX_REDIRECTS = 3
LOOKUP_THREADS = 4  # name lookups at once per worker; a stuck one holds its thread until the resolver gives up
DEFAULT_PORTS = (80, 443)
_REDIRECTS = (301, 302, 303, 307, 308)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_SIIT = ipaddress.ip_network("::ffff:0:0:0/96")
_COMPATIBLE = ipaddress.ip_network("::/96")
USER_AGENT = "embed-rerank-image-fetch/1"
log = logging.getLogger(__name__)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
T = TypeVar("T")


def _bits(value: int, first: int, last: int) -> int:
    """Bits `first`..`last` of a 128-bit address, counted from the most significant (RFC 6052's way)."""
    return (value >> (127 - last)) & ((1 << (last - first + 1)) - 1)


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address leads to: IPv4-mapped, IPv4-compatible (::/96), SIIT
    (::ffff:0:0:0/96), NAT64 (64:ff9b::/96, and 64:ff9b:1::/48 in each layout RFC 6052 allows
    for it), 6to4 and Teredo (server and client)."""
    value = int(address)
    inner = [address.ipv4_mapped, address.sixtofour, *(address.teredo or ())]
    if address in _NAT64 or address in _SIIT or (address in _COMPATIBLE and value > 1):
        inner.append(ipaddress.IPv4Address(value & 0xFFFFFFFF))
    if address in _NAT64_LOCAL:
        if _bits(value, 48, 95) == 0:  # the /96 layout: the IPv4 address last
            inner.append(ipaddress.IPv4Address(value & 0xFFFFFFFF))
        else:  # the /48, /56 and /64 layouts, around the u octet (bits 64-71)
            inner += [ipaddress.IPv4Address(_bits(value, 48, 63) << 16 | _bits(value, 72, 87)),
                      ipaddress.IPv4Address(_bits(value, 56, 63) << 24 | _bits(value, 72, 95)),
                      ipaddress.IPv4Address(_bits(value, 72, 103))]
    return [v4 for v4 in inner if v4 is not None]


def public_address(address: Address) -> bool:
    """A globally routable unicast address, also when an IPv4 address hides inside an IPv6 one."""
    if address.is_multicast or not address.is_global:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        return all(public_address(v4) for v4 in embedded_ipv4(address))
    return True


def split_host_port(pattern: str) -> tuple[str, int | None]:
    """An IMAGE_URL_HOSTS entry as (host pattern, port or None): `a.example.com:8080`, `[::1]:8080`,
    `::1`, `*.example.com`."""
    if pattern.startswith("["):
        host, _, rest = pattern[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if pattern.count(":") == 1:
        host, port = pattern.split(":")
        return host, int(port) if port.isdigit() else None
    return pattern, None


def _host_matches(host: str, pattern: str) -> bool:
    return pattern == "*" or host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:]))


def host_allowed(host: str, patterns: tuple[str, ...], port: int = 443) -> bool:
    """Whether IMAGE_URL_HOSTS lets `host:port` be fetched: an entry without a port allows 80 and 443,
    one with a port (`a.example.com:8080`) that port only."""
    for pattern in patterns:
        name, listed = split_host_port(pattern)
        if _host_matches(host, name) and (port in DEFAULT_PORTS if listed is None else port == listed):
            return True
    return False


def _getaddrinfo(host: str, port: int) -> list[str]:
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


class _Failed(Exception):
    """A fetch that failed past the host-list check; the reason goes to the log, not to the client."""


class Lookups:
    """Name lookups in threads of their own, at most `threads` at once: getaddrinfo cannot be
    cancelled, so a lookup past the deadline keeps its thread until the resolver gives up, and
    when every thread is taken a lookup fails at once rather than waiting behind them (the shared
    pool, which tokenizes texts, never holds one). `resolve` is the lookup (tests pass another)."""

    def __init__(self, threads: int = LOOKUP_THREADS,
                 resolve: Callable[[str, int], list[str]] = _getaddrinfo) -> None:
        self.threads = threads
        self.resolve = resolve
        self.busy = 0
        self._lock = threading.Lock()

    async def addresses(self, host: str, port: int) -> list[str]:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.busy >= self.threads:
                raise _Failed(f"all {self.threads} lookup threads are busy")
            self.busy += 1
        answer: asyncio.Future[list[str]] = loop.create_future()

        def run() -> None:
            result: list[str] | None = None
            error: BaseException | None = None
            try:
                result = self.resolve(host, port)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting coroutine
                error = exc
            finally:
                with self._lock:
                    self.busy -= 1

            def deliver() -> None:
                if answer.done():
                    return  # the fetch gave up on it (its deadline passed)
                if error is not None:
                    answer.set_exception(error)
                else:
                    answer.set_result(result or [])

            try:
                loop.call_soon_threadsafe(deliver)
            except RuntimeError:
                pass  # the loop closed while the lookup hung: nobody waits for it

        # A daemon thread, not a pool's: a hung lookup never holds up the process's exit.
        threading.Thread(target=run, name="image-url-lookup", daemon=True).start()
        return await answer


class ImageFetcher:
    """Fetches image URLs under the rules of the module docstring. `address_allowed` is the address
    rule and `lookups` the resolver (tests pass others to reach a server on 127.0.0.1 or to hang a
    lookup; no setting changes them). The class attributes name the setting and the advice in its
    errors: the RunPod batch job's URLs (BATCH_URL_HOSTS) go through a subclass."""

    hosts_setting = "IMAGE_URL_HOSTS"
    code_word = "image_url"  # error codes: invalid_<word>, <word>_host_not_allowed
    instead = "send the image as a data URI"
    accept = "image/png, image/jpeg, image/webp, image/gif"

    def __init__(self, hosts: tuple[str, ...], timeout_s: float, max_bytes: int, concurrency: int,
                 address_allowed: Callable[[Address], bool] = public_address, lookups: Lookups | None = None) -> None:
        self.hosts = hosts
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.concurrency = concurrency
        self.address_allowed = address_allowed
        self.lookups = lookups or Lookups()
        self._gates: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}
        self._ssl: ssl.SSLContext | None = None

    def _gate(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        gate = self._gates.get(loop)
        if gate is None:
            gate = self._gates[loop] = asyncio.Semaphore(self.concurrency)
        return gate

    async def fetch(self, url: str, where: str, use: Callable[[io.BytesIO], Awaitable[T]] | None = None) -> Any:
        """The image's bytes, or `await use(bytes)` when `use` is given (the fetch keeps its turn until
        then, so at most `concurrency` raw images are held at once); else a 4xx naming `where`."""
        self._check(url, where)  # refused at once, before waiting for a turn
        async with self._gate():
            try:
                data = await asyncio.wait_for(self._fetch(url), self.timeout_s)
            except asyncio.TimeoutError:
                raise self.failed(url, where, f"past IMAGE_URL_TIMEOUT={self.timeout_s:g}s") from None
            except _Failed as exc:
                raise self.failed(url, where, str(exc)) from None
            except PayloadTooLarge as exc:
                exc.message = f"{where}: {exc.message}"
                exc.args, exc.param = (exc.message,), where
                raise
            if use is None:
                return data.getvalue()
            return await use(data)

    def failed(self, url: str, where: str, reason: str) -> BadRequest:
        """The one error of every fetch that failed past the host-list check, whatever the reason."""
        log.info("image URL %s not fetched: %s", _short(url), reason)
        return BadRequest(f"{where}: the image at {_short(url)} could not be fetched: check that the URL answers 200 "
                          f"with a PNG, JPEG, WebP or GIF from a public address within IMAGE_URL_TIMEOUT="
                          f"{self.timeout_s:g}s, redirecting only within IMAGE_URL_HOSTS, or send the image inline as "
                          "data:image/png;base64,...", param=where, code="image_url_fetch_failed")

    def _check(self, url: str, where: str) -> tuple[str, str, int]:
        """(scheme, host, port) of a URL that may be fetched; else a 400."""
        try:
            parts = urlsplit(url)
            host, port = (parts.hostname or "").rstrip(".").lower(), parts.port
            host = host.encode("idna").decode("ascii") if not host.isascii() else host
        except (ValueError, UnicodeError):
            raise BadRequest(f"{where} is not a valid URL: send http(s)://host/path", param=where,
                             code=f"invalid_{self.code_word}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise BadRequest(f"{where}: only http and https URLs are fetched, not {scheme}:", param=where,
                             code=f"invalid_{self.code_word}")
        if parts.username is not None or parts.password is not None:
            raise BadRequest(f"{where}: URLs with user:password@ are not fetched", param=where, code=f"invalid_{self.code_word}")
        if not host:
            raise BadRequest(f"{where} is a URL without a host", param=where, code=f"invalid_{self.code_word}")
        port = port or (443 if scheme == "https" else 80)
        if not host_allowed(host, self.hosts, port):
            if port not in DEFAULT_PORTS and any(_host_matches(host, split_host_port(p)[0]) for p in self.hosts):
                listed = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                raise BadRequest(f"{where}: port {port} is not fetched from {host!r}: only 80 and 443 are, unless "
                                 f"{self.hosts_setting} lists {listed!r}; {self.instead}, or ask the operator",
                                 param=where, code=f"{self.code_word}_host_not_allowed")
            raise BadRequest(f"{where}: the host {host!r} is not in {self.hosts_setting}: {self.instead}, or "
                             "ask the operator to add the host", param=where, code=f"{self.code_word}_host_not_allowed")
        return scheme, host, port

    async def _resolve(self, host: str, port: int) -> Address:
        """The address to connect to: every address of the host must pass `address_allowed`."""
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                found = await self.lookups.addresses(host, port)
            except (OSError, UnicodeError, ValueError) as exc:
                raise _Failed(f"{host!r} does not resolve ({exc})") from None
            addresses = list(dict.fromkeys(ipaddress.ip_address(a.split("%")[0]) for a in found))
        refused = [str(a) for a in addresses if not self.address_allowed(a)]
        if not addresses or refused:
            raise _Failed(f"{host!r} has addresses that are not public: {refused}")
        return addresses[0]

    async def _fetch(self, url: str) -> io.BytesIO:
        import httpx

        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        async with httpx.AsyncClient(trust_env=False, follow_redirects=False, verify=self._ssl,
                                     timeout=httpx.Timeout(self.timeout_s)) as client:
            for hop in range(MAX_REDIRECTS + 1):
                try:
                    scheme, host, port = self._check(url, "the redirect")
                except BadRequest as exc:
                    if hop == 0:
                        raise
                    raise _Failed(exc.message) from None
                address = await self._resolve(host, port)
                parts = urlsplit(url)
                literal = f"[{address}]" if address.version == 6 else str(address)
                pinned = parts._replace(scheme=scheme, netloc=f"{literal}:{port}").geturl()
                default_port = port == (443 if scheme == "https" else 80)
                headers = {"Host": host if default_port else f"{host}:{port}", "User-Agent": USER_AGENT,
                           "Accept": self.accept, "Accept-Encoding": "identity"}
                extensions = {"sni_hostname": host} if scheme == "https" else {}
                try:
                    async with client.stream("GET", pinned, headers=headers, extensions=extensions) as response:
                        if response.status_code in _REDIRECTS and response.headers.get("location"):
                            url = urljoin(url, response.headers["location"])
                            continue
                        if response.status_code != 200:
                            raise _Failed(f"HTTP {response.status_code}")
                        return await self._read(response)
                except (httpx.HTTPError, httpx.InvalidURL, ValueError, UnicodeError) as exc:
                    raise _Failed(f"{type(exc).__name__}: {exc}") from None
        raise _Failed(f"more than {MAX_REDIRECTS} redirects")

    async def _read(self, response: Any) -> io.BytesIO:
        length = response.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            raise self._too_large()
        data, size = io.BytesIO(), 0  # decoded where it lies: the image is held once, never joined or copied
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if size > self.max_bytes:
                raise self._too_large()
            data.write(chunk)
        data.seek(0)
        return data

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"the image is over MAX_IMAGE_BYTES={self.max_bytes} bytes: send a smaller image",
                               code="image_too_large")


def _short(url: str) -> str:
    return url if len(url) <= 120 else url[:117] + "..."
