"""Image inputs without a model or a server: every image is checked before it is decoded, and a URL
is fetched only from an allowed host with a public address (runners.capabilities.images,
runners.capabilities.image_urls, the settings). A local HTTP server counts what reaches it."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import ipaddress
import socket
import struct
import threading
import time
import tracemalloc
import zlib
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from runners.capabilities.image_urls import ImageFetcher, Lookups, host_allowed, public_address
from runners.capabilities.images import MAX_JPEG_SCANS, decode, inline_bytes, is_url, jpeg_scans, sniff
from runners.errors import BadRequest, PayloadTooLarge, ServiceError
from runners.settings import SettingsError, load_settings

LIMIT = 16_777_216


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_bomb(width: int = 10_000, height: int = 5_000) -> bytes:
    """A 1-bit black PNG written row by row: 50 megapixels in about 6 KB, never held whole in memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    packer = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment of a well-formed JPEG, a scan's entropy-coded data included."""
    pos, out = 2, []
    while pos < len(data):
        marker = data[pos + 1]
        if marker == 0xD9:
            return out + [(marker, pos, pos + 2)]
        end = pos + 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if marker == 0xDA:
            while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
        out.append((marker, pos, end))
        pos = end
    return out


def many_scans_jpeg(size: tuple[int, int] = (2048, 2048), scans: int = 2000) -> bytes:
    """A flat progressive JPEG with its last scan (16 bytes here) repeated: each repetition costs libjpeg
    another pass over the whole image, so 2,000 of them are seconds of CPU from 57 KB."""
    data = encoded(Image.new("RGB", size, (90, 120, 150)), "JPEG", progressive=True)
    segments = jpeg_segments(data)
    _, start, end = [s for s in segments if s[0] == 0xDA][-1]
    return data[:segments[-1][1]] + data[start:end] * scans + b"\xff\xd9"


def data_uri(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


# ---- decoding ----


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_each_format_decodes_to_rgb(fmt):
    data = encoded(Image.new("RGB", (40, 30), (200, 10, 10)), fmt)
    assert sniff(data) == fmt
    image = decode(data, "input[0]", LIMIT)
    assert (image.format, image.width, image.height, image.image.mode) == (fmt, 40, 30, "RGB")


def test_modes_convert_and_animations_give_their_first_frame():
    for mode, color in (("RGBA", (10, 20, 30, 0)), ("P", 3), ("L", 9), ("CMYK", (1, 2, 3, 4))):
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        assert decode(encoded(Image.new(mode, (8, 8), color), fmt), "input[0]", LIMIT).image.mode == "RGB"
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    gif = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode(gif, "input[0]", LIMIT).image.getpixel((0, 0)) == (255, 0, 0)


def test_a_50_megapixel_png_of_a_few_kb_is_refused_before_decoding():
    bomb = png_bomb()
    assert len(bomb) < 10_000
    started = time.perf_counter()
    with pytest.raises(PayloadTooLarge) as err:
        decode(bomb, "input[2]", LIMIT)
    assert time.perf_counter() - started < 0.05  # the header only: decoding would take seconds and 50 MB
    assert err.value.status == 413 and "input[2] is 10000 x 5000 pixels" in err.value.message
    assert "MAX_IMAGE_PIXELS=16777216" in err.value.message


@pytest.mark.parametrize("fmt", ["JPEG", "GIF", "WEBP"])
def test_other_formats_are_refused_by_their_header_size(fmt):
    data = encoded(Image.new("L", (1200, 1000)), fmt)
    with pytest.raises(PayloadTooLarge, match="1200 x 1000 pixels"):
        decode(data, "input[0]", 1_000_000)


def test_an_elongated_image_is_held_to_the_limit_after_the_processor_scales_it():
    strip = encoded(Image.new("RGB", (20_000, 1)), "PNG")  # 20,000 pixels; CLIP's processor would make 32 x 640,000
    decode(strip, "input[0]", LIMIT)
    with pytest.raises(PayloadTooLarge, match="too elongated"):
        decode(strip, "input[0]", LIMIT, resized_pixels=lambda w, h: 32 * 32 * max(w, h) // min(w, h))


def test_truncated_corrupt_and_non_images_are_400_naming_the_input():
    png = encoded(Image.new("RGB", (200, 100), (1, 2, 3)), "PNG")
    jpeg = encoded(Image.new("RGB", (200, 100), (1, 2, 3)), "JPEG")
    cases = {"truncated png": png[: len(png) // 2], "truncated jpeg": jpeg[:200], "text": b"hello, world",
             "bmp": encoded(Image.new("RGB", (4, 4)), "BMP"), "header only": png[:40]}
    for name, data in cases.items():
        with pytest.raises(BadRequest) as err:
            decode(data, "inputs[1].content[0]", LIMIT)
        assert err.value.status == 400 and err.value.message.startswith("inputs[1].content[0]"), name
        assert err.value.code == "invalid_image"


SEEDS = {fmt: encoded(Image.new("RGB", (24, 16), (30, 140, 250)), fmt) for fmt in ("PNG", "JPEG", "WEBP", "GIF")}


@given(fmt=st.sampled_from(sorted(SEEDS)), cut=st.integers(0, 400),
       flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6))
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_damaged_images_are_always_a_4xx(fmt, cut, flips):
    """Truncated and bit-flipped files of every format: a decoded RGB image or a 4xx, never anything else."""
    data = bytearray(SEEDS[fmt])
    for at, value in flips:
        data[at % len(data)] = value
    data = bytes(data[: len(data) - cut % len(data)])
    try:
        assert decode(data, "input[0]", 100_000).image.mode == "RGB"
    except ServiceError as exc:
        assert 400 <= exc.status < 500 and exc.message.startswith("input[0]")


def test_data_uris_are_checked_before_base64_decoding():
    png = encoded(Image.new("RGB", (4, 4)), "PNG")
    assert inline_bytes(data_uri(png), "input[0]", 1000) == png
    assert inline_bytes(data_uri(png, "jpg"), "input[0]", 1000) == png  # the declared type need not match: sniffed
    assert inline_bytes(base64.b64encode(png).decode(), "input[0]", 1000) == png  # bare base64, as Jina sends
    wrapped = base64.encodebytes(png * 20).decode()  # MIME-style, with newlines
    assert inline_bytes("data:image/png;base64," + wrapped, "input[0]", 10_000) == png * 20
    with pytest.raises(PayloadTooLarge):
        inline_bytes("data:image/png;base64," + "A" * 4000, "input[0]", 1000)
    for bad, code in (("data:image/svg+xml;base64,PHN2Zz4=", "unsupported_image_format"),
                      ("data:text/plain;base64,aGk=", "invalid_image"), ("data:image/png;base64,***", "invalid_image"),
                      ("a photo of a cat", "invalid_image"), ("data:image/png;base64,", "invalid_image")):
        with pytest.raises(BadRequest) as err:
            inline_bytes(bad, "input[3]", 1000)
        assert err.value.code == code and "input[3]" in err.value.message
    assert is_url("https://example.com/a.png") and is_url("FILE:///etc/passwd") and not is_url("data:image/png;base64,x")
    assert not is_url(base64.b64encode(png).decode())


def test_a_progressive_jpeg_passes_and_one_of_thousands_of_scans_is_refused_before_decoding():
    picture = Image.effect_mandelbrot((256, 192), (-2, -1.5, 1, 1.5), 64).convert("RGB")
    normal = encoded(picture, "JPEG", progressive=True, quality=90)
    assert 6 <= jpeg_scans(normal) <= 20 and decode(normal, "input[0]", LIMIT).width == 256
    assert jpeg_scans(encoded(picture, "JPEG")) == 1
    hostile = many_scans_jpeg()
    assert jpeg_scans(hostile) > MAX_JPEG_SCANS
    started = time.perf_counter()
    with pytest.raises(BadRequest) as err:
        decode(hostile, "input[2]", LIMIT)
    assert time.perf_counter() - started < 0.2  # decoding it takes seconds
    assert err.value.code == "image_too_complex" and f"MAX_JPEG_SCANS={MAX_JPEG_SCANS}" in err.value.message
    assert "input[2]" in err.value.message and "baseline JPEG" in err.value.message
    at_cap = many_scans_jpeg((64, 64), MAX_JPEG_SCANS - 10)
    assert jpeg_scans(at_cap) == MAX_JPEG_SCANS and decode(at_cap, "input[0]", LIMIT).width == 64


def exif_with_thumbnail(thumbnail: bytes) -> bytes:
    """An APP1 Exif segment whose IFD1 points at a JPEG thumbnail, as cameras write it."""
    ifd1 = struct.pack("<HHHII HHII I", 2, 0x0201, 4, 1, 8 + 6 + 2 + 24 + 4, 0x0202, 4, 1, len(thumbnail), 0)
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<HI", 0, 14) + ifd1 + thumbnail
    body = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body


def test_the_scans_of_an_exif_thumbnail_are_not_counted():
    thumbnail = many_scans_jpeg((16, 16), 150)  # its markers, SOS included, sit inside the APP1 segment
    assert jpeg_scans(thumbnail) > MAX_JPEG_SCANS and len(thumbnail) < 60_000
    baseline = encoded(Image.new("RGB", (80, 60), (10, 200, 30)), "JPEG")
    with_exif = baseline[:2] + exif_with_thumbnail(thumbnail) + baseline[2:]
    assert jpeg_scans(with_exif) == 1
    image = decode(with_exif, "input[0]", LIMIT)
    assert (image.width, image.height) == (80, 60)
    assert with_exif.count(b"\xff\xda") > MAX_JPEG_SCANS  # what a count of SOS bytes would refuse
    assert Image.open(io.BytesIO(with_exif)).info["exif"].startswith(b"Exif")


# ---- URLs ----


def test_public_addresses():
    refused = ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.100.100.200", "0.0.0.0",
               "224.0.0.1", "255.255.255.255", "::1", "fe80::1", "fd00:ec2::254", "::ffff:127.0.0.1",
               "64:ff9b::7f00:1", "2002:7f00:1::1", "::"]
    allowed = ["8.8.8.8", "93.184.216.34", "2001:4860:4860::8888", "64:ff9b::808:808"]
    assert not [a for a in refused if public_address(ipaddress.ip_address(a))]
    assert all(public_address(ipaddress.ip_address(a)) for a in allowed)


def v6(value: int) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(value)


def ipv6_forms(v4: str) -> dict[str, ipaddress.IPv6Address]:
    """Every IPv6 form that leads to an IPv4 address (RFC 4291, 6052, 6145, 3056, 4380, 8215)."""
    n = int(ipaddress.IPv4Address(v4))
    nat64_local = int(ipaddress.IPv6Address("64:ff9b:1::"))
    return {
        "mapped": v6(0xFFFF << 32 | n),
        "compatible": v6(n),
        "siit": v6(0xFFFF << 48 | n),
        "nat64": v6(int(ipaddress.IPv6Address("64:ff9b::")) | n),
        "nat64 local /96": v6(nat64_local | n),
        "nat64 local /48": v6(nat64_local | (n >> 16) << 64 | (n & 0xFFFF) << 40),
        "nat64 local /56": v6(nat64_local | (n >> 24) << 64 | (n & 0xFFFFFF) << 32),
        "nat64 local /64": v6(nat64_local | 1 << 64 | n << 24),  # subnet 1 of the /48, IPv4 after the u octet
        "6to4": v6(0x2002 << 112 | n << 80 | 1),
        "teredo": v6(0x20010000 << 96 | int(ipaddress.IPv4Address("8.8.8.8")) << 64 | (~n & 0xFFFFFFFF)),
    }


@pytest.mark.parametrize("v4", ["169.254.169.254", "10.0.0.1", "127.0.0.1"])
def test_every_ipv6_form_of_a_private_ipv4_address_is_refused(v4):
    forms = ipv6_forms(v4)
    assert forms["compatible"] == ipaddress.ip_address("::" + v4) and forms["siit"] == ipaddress.ip_address("::ffff:0:" + v4)
    assert forms["nat64 local /96"] == ipaddress.ip_address("64:ff9b:1::" + v4)
    assert not {name: str(a) for name, a in forms.items() if public_address(a)}
    assert not public_address(ipaddress.ip_address(v4))


def test_ipv6_forms_of_a_public_ipv4_address_are_accepted():
    forms = ipv6_forms("8.8.8.8")
    for name in ("compatible", "siit", "nat64", "6to4"):
        assert public_address(forms[name]), name


def test_host_patterns():
    hosts = ("images.example.com", "*.cdn.example.com", "203.0.113.7")
    assert host_allowed("images.example.com", hosts) and host_allowed("a.b.cdn.example.com", hosts)
    assert not host_allowed("cdn.example.com", hosts) and not host_allowed("evil-images.example.com", hosts)
    assert not host_allowed("images.example.com.evil.net", hosts) and host_allowed("anything.net", ("*",))


def test_ports_other_than_80_and_443_need_their_own_entry():
    hosts = ("images.example.com", "a.example.com:8080", "[2001:db8::1]:8443", "*.cdn.example.com:9000")
    assert host_allowed("images.example.com", hosts, 80) and host_allowed("images.example.com", hosts, 443)
    assert not host_allowed("images.example.com", hosts, 22) and not host_allowed("images.example.com", hosts, 8080)
    assert host_allowed("a.example.com", hosts, 8080) and not host_allowed("a.example.com", hosts, 443)
    assert host_allowed("2001:db8::1", hosts, 8443) and not host_allowed("2001:db8::1", hosts, 443)
    assert host_allowed("x.cdn.example.com", hosts, 9000) and not host_allowed("x.cdn.example.com", hosts, 443)


class Recorder(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.paths: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


PNG = encoded(Image.new("RGB", (16, 16), (0, 128, 255)), "PNG")


# 0.8 MB of PNG (noise does not compress), 512 x 512 pixels.
BIG = encoded(Image.frombytes("RGB", (512, 512), np.random.default_rng(0).integers(0, 256, 512 * 512 * 3,
                                                                                        dtype=np.uint8).tobytes()), "PNG")


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.server.paths.append(self.path)  # type: ignore[attr-defined]
        if self.path == "/img.png":
            self._send(200, PNG, {"Content-Length": str(len(PNG))})
        elif self.path.startswith("/big/"):
            self._send(200, BIG, {"Content-Length": str(len(BIG))})
        elif self.path == "/in":
            self._send(302, b"", {"Location": "/img.png", "Content-Length": "0"})
        elif self.path == "/out":
            self._send(302, b"", {"Location": "http://metadata.internal/latest", "Content-Length": "0"})
        elif self.path == "/loop":
            self._send(302, b"", {"Location": "/loop", "Content-Length": "0"})
        elif self.path == "/declared":
            self._send(200, b"x" * 10, {"Content-Length": str(50 * 1024 * 1024)})
        elif self.path == "/stream":  # no length: 1 MB read in pieces
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(64):
                    self.wfile.write(b"\0" * 16384)
            except OSError:
                pass
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            for _ in range(20):
                time.sleep(0.1)
                try:
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                except OSError:
                    return
        else:
            self._send(404, b"", {"Content-Length": "0"})

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def origin() -> Iterator[Recorder]:
    server = Recorder()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def fetch(fetcher: ImageFetcher, url: str) -> bytes:
    return asyncio.run(fetcher.fetch(url, "input[0]"))


def loopback_fetcher(origin: Recorder, **kw) -> ImageFetcher:
    """Reaching 127.0.0.1 needs another address rule than the service's: only tests pass one."""
    options = {"hosts": (f"127.0.0.1:{origin.server_address[1]}",), "timeout_s": 5.0, "max_bytes": 100_000,
               "concurrency": 2} | kw
    return ImageFetcher(**options, address_allowed=lambda address: True)


def test_an_allowed_host_with_a_loopback_address_gets_nothing_sent(origin):
    before = len(origin.paths)
    by_name = origin.url.replace("127.0.0.1", "localhost") + "/img.png"
    port = origin.server_address[1]
    for hosts, url in (((f"127.0.0.1:{port}",), origin.url + "/img.png"), ((f"localhost:{port}",), by_name)):
        with pytest.raises(BadRequest) as err:
            fetch(ImageFetcher(hosts, 5.0, 100_000, 2), url)
        assert err.value.code == "image_url_fetch_failed"
    assert len(origin.paths) == before


def test_a_port_is_fetched_only_where_the_host_list_names_it(origin):
    port = origin.server_address[1]
    before = len(origin.paths)
    with pytest.raises(BadRequest) as err:
        fetch(loopback_fetcher(origin, hosts=("127.0.0.1",)), origin.url + "/img.png")
    assert err.value.code == "image_url_host_not_allowed" and f"IMAGE_URL_HOSTS lists '127.0.0.1:{port}'" in err.value.message
    assert len(origin.paths) == before
    assert fetch(loopback_fetcher(origin), origin.url + "/img.png") == PNG


def test_every_failed_fetch_is_the_same_error(origin):
    """A port scanner learns nothing: whatever went wrong past the host list, one status, code and message."""
    port = origin.server_address[1]
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connection refused
    resetter = socket.socket()
    resetter.bind(("127.0.0.1", 0))
    resetter.listen(8)
    reset_port = resetter.getsockname()[1]

    def reset_all() -> None:
        while True:
            try:
                conn, _ = resetter.accept()
            except OSError:
                return
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # an RST, not a FIN

    threading.Thread(target=reset_all, daemon=True).start()

    def no_such_host(host: str, p: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    hosts = tuple(f"{h}:{p}" for h in ("127.0.0.1", "nowhere.test", "loopback.test") for p in (port, closed_port, reset_port))
    rule = lambda a: True  # noqa: E731 - the test's address rule: 127.0.0.1 is "public" here
    cases = {
        "does not resolve": (ImageFetcher(hosts, 0.5, 100_000, 4, rule, Lookups(resolve=no_such_host)),
                             f"http://nowhere.test:{port}/img.png"),
        "not a public address": (ImageFetcher(hosts, 0.5, 100_000, 4, lookups=Lookups(resolve=lambda h, p: ["127.0.0.1"])),
                                 f"http://loopback.test:{port}/img.png"),
        "connection refused": (ImageFetcher(hosts, 0.5, 100_000, 4, rule), f"http://127.0.0.1:{closed_port}/img.png"),
        "connection reset": (ImageFetcher(hosts, 0.5, 100_000, 4, rule), f"http://127.0.0.1:{reset_port}/img.png"),
        "TLS": (ImageFetcher(hosts, 0.5, 100_000, 4, rule), f"https://127.0.0.1:{port}/img.png"),
        "timeout": (ImageFetcher(hosts, 0.5, 100_000, 4, rule), origin.url + "/slow"),
        "HTTP 404": (ImageFetcher(hosts, 0.5, 100_000, 4, rule), origin.url + "/missing"),
        "redirect out": (ImageFetcher(hosts, 0.5, 100_000, 4, rule), origin.url + "/out"),
        "redirect loop": (ImageFetcher(hosts, 0.5, 100_000, 4, rule), origin.url + "/loop"),
    }
    seen = {}
    try:
        for name, (fetcher, url) in cases.items():
            with pytest.raises(BadRequest) as err:
                fetch(fetcher, url)
            error = err.value
            seen[name] = (error.status, error.code, error.param, error.message.replace(url, "URL"))
    finally:
        resetter.close()
    assert len(set(seen.values())) == 1, seen
    status, code, param, message = next(iter(seen.values()))
    assert (status, code, param) == (400, "image_url_fetch_failed", "input[0]")
    assert message.startswith("input[0]: the image at URL could not be fetched") and "data:image/png;base64" in message


def test_a_lookup_that_never_answers_holds_only_its_own_thread(origin):
    release = threading.Event()
    calls = []

    def hangs(host: str, port: int) -> list[str]:
        calls.append(host)
        release.wait(30)
        return ["127.0.0.1"]

    port = origin.server_address[1]
    lookups = Lookups(threads=2, resolve=hangs)
    fetcher = ImageFetcher((f"hang.test:{port}",), 0.4, 100_000, 8, lambda a: True, lookups)
    url = f"http://hang.test:{port}/img.png"

    async def scenario() -> tuple[list, float, float]:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        first = await asyncio.gather(fetcher.fetch(url, "input[0]"), fetcher.fetch(url, "input[1]"),
                                     return_exceptions=True)
        waited = time.perf_counter() - started
        started = time.perf_counter()
        with pytest.raises(BadRequest):  # both lookup threads are stuck: refused at once, not queued
            await fetcher.fetch(url, "input[2]")
        refused_in = time.perf_counter() - started
        assert await loop.run_in_executor(None, lambda: 7) == 7  # the shared pool is free
        return first, waited, refused_in

    try:
        first, waited, refused_in = asyncio.run(scenario())
        assert all(isinstance(r, BadRequest) and r.code == "image_url_fetch_failed" for r in first)
        assert 0.35 < waited < 1.0 and refused_in < 0.1 and len(calls) == 2 and lookups.busy == 2
    finally:
        release.set()
    deadline = time.monotonic() + 5
    while lookups.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lookups.busy == 0


def test_fetched_images_are_decoded_as_they_arrive_and_their_bytes_dropped(origin):
    """16 URLs of 0.8 MB each, one fetch at a time: the request's peak of raw bytes stays under two
    images' worth (a fetch holds its turn until its image is decoded, and the bytes are read where
    they were written), not the 16 images of keeping every fetched image until all arrived."""
    from types import SimpleNamespace

    from runners.capabilities.image_embed import ImageEmbedding
    from runners.capabilities.queries import Part

    embedding = ImageEmbedding.__new__(ImageEmbedding)
    embedding.settings = load_settings({"MODEL_NAMES": "some/model", "MAX_IMAGE_BYTES": str(2 << 20)})
    embedding.image_fetcher = loopback_fetcher(origin, max_bytes=2 << 20, concurrency=1, timeout_s=30)
    side = SimpleNamespace(resized_pixels=lambda w, h: w * h, prepare=lambda image: image.size)
    parts = [Part("image", f"{origin.url}/big/{i}.png", f"input[{i}]") for i in range(16)]
    parts.insert(3, Part("image", data_uri(PNG), "input[3]"))
    model = SimpleNamespace(images=side)
    asyncio.run(embedding._load_images(model, parts[:1]))  # imports and the TLS context, before counting
    tracemalloc.start()
    try:
        prepared, decoded = asyncio.run(embedding._load_images(model, parts))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert prepared == [(512, 512)] * 3 + [(16, 16)] + [(512, 512)] * 13 and all(d.image is None for d in decoded)
    assert peak < 2.5 * len(BIG), (peak, len(BIG))  # measured 1.7 x; every image kept would be 16 x


def test_hosts_and_schemes_are_checked_before_connecting(origin):
    fetcher = loopback_fetcher(origin)
    before = len(origin.paths)
    for url, code in (("http://example.com/a.png", "image_url_host_not_allowed"),
                      (f"ftp://127.0.0.1:{origin.server_address[1]}/img.png", "invalid_image_url"),
                      (origin.url.replace("http://", "http://user:pw@") + "/img.png", "invalid_image_url"),
                      ("http:///img.png", "invalid_image_url")):
        with pytest.raises(BadRequest) as err:
            fetch(fetcher, url)
        assert err.value.code == code, url
    assert len(origin.paths) == before


def test_fetch_follows_redirects_only_within_the_rules(origin):
    fetcher = loopback_fetcher(origin)
    assert fetch(fetcher, origin.url + "/img.png") == PNG
    assert fetch(fetcher, origin.url + "/in") == PNG
    for path in ("/out", "/loop", "/missing"):  # a redirect out of IMAGE_URL_HOSTS, too many, a 404
        with pytest.raises(BadRequest) as err:
            fetch(fetcher, origin.url + path)
        assert err.value.code == "image_url_fetch_failed" and "metadata.internal" not in err.value.message
    for odd in (origin.url + "/a b\x00.png", origin.url + "/\u00e9t\u00e9.png"):  # odd paths: a 4xx, never a 5xx
        with pytest.raises(BadRequest):
            fetch(fetcher, odd)
    with pytest.raises(BadRequest, match="not in IMAGE_URL_HOSTS"):
        fetch(fetcher, "http://b\u00fccher.example/a.png")


def test_the_byte_limit_holds_while_streaming(origin):
    fetcher = loopback_fetcher(origin)
    for path in ("/declared", "/stream"):
        with pytest.raises(PayloadTooLarge, match="MAX_IMAGE_BYTES=100000"):
            fetch(fetcher, origin.url + path)


def test_one_deadline_for_the_whole_fetch(origin):
    started = time.perf_counter()
    with pytest.raises(BadRequest) as err:
        fetch(loopback_fetcher(origin, timeout_s=0.5), origin.url + "/slow")  # a byte every 0.1 s: each read is quick
    assert err.value.code == "image_url_fetch_failed" and time.perf_counter() - started < 1.5


def test_concurrent_fetches_are_capped(origin):
    fetcher = loopback_fetcher(origin, concurrency=1, timeout_s=0.5)

    async def two() -> list:
        return await asyncio.gather(fetcher.fetch(origin.url + "/slow", "input[0]"),
                                    fetcher.fetch(origin.url + "/img.png", "input[1]"), return_exceptions=True)

    started = time.perf_counter()
    slow, quick = asyncio.run(two())
    assert isinstance(slow, ServiceError) and quick == PNG
    assert time.perf_counter() - started >= 0.5  # the second waited for the first's turn


# ---- settings ----


def test_image_settings():
    base = {"MODEL_NAMES": "some/model"}
    settings = load_settings(base)
    assert (settings.image_urls, settings.max_image_pixels, settings.max_image_bytes) == (False, 16_777_216, 10 << 20)
    on = load_settings(base | {"IMAGE_URLS": "allow", "IMAGE_URL_HOSTS": "Images.Example.com; *.cdn.example.com,[::1]"})
    assert on.image_urls and on.image_url_hosts == ("images.example.com", "*.cdn.example.com", "::1")
    ports = load_settings(base | {"IMAGE_URL_HOSTS": "a.example.com:8080;[2001:DB8::1]:8443;10.0.0.1:81;2001:db8::2"})
    assert ports.image_url_hosts == ("a.example.com:8080", "[2001:db8::1]:8443", "10.0.0.1:81", "2001:db8::2")
    for env, words in (({"IMAGE_URLS": "allow"}, "needs IMAGE_URL_HOSTS"), ({"IMAGE_URLS": "yes"}, "deny, allow"),
                       ({"IMAGE_URL_HOSTS": "https://example.com"}, "not a host"),
                       ({"IMAGE_URL_HOSTS": "example.com:80a"}, "port is not a number"),
                       ({"IMAGE_URL_HOSTS": "example.com:0"}, "port is not a number"),
                       ({"IMAGE_URL_HOSTS": "example.com/images"}, "not a host"),
                       ({"MAX_IMAGE_PIXELS": "many"}, "not an integer"), ({"IMAGE_URL_TIMEOUT": "0"}, "greater than 0")):
        with pytest.raises(SettingsError, match=words):
            load_settings(base | env)
