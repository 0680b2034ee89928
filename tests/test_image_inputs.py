"""Image inputs without a model or a server: every image is checked before it is decoded, and a URL
is fetched only from an allowed host with a public address (runners.capabilities.images,
runners.capabilities.image_urls, the settings). A local HTTP server counts what reaches it."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import ipaddress
import struct
import threading
import time
import zlib
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from runners.capabilities.image_urls import ImageFetcher, host_allowed, public_address
from runners.capabilities.images import decode, inline_bytes, is_url, sniff
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


# ---- URLs ----


def test_public_addresses():
    refused = ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.100.100.200", "0.0.0.0",
               "224.0.0.1", "255.255.255.255", "::1", "fe80::1", "fd00:ec2::254", "::ffff:127.0.0.1",
               "64:ff9b::7f00:1", "2002:7f00:1::1", "::"]
    allowed = ["8.8.8.8", "93.184.216.34", "2001:4860:4860::8888", "64:ff9b::808:808"]
    assert not [a for a in refused if public_address(ipaddress.ip_address(a))]
    assert all(public_address(ipaddress.ip_address(a)) for a in allowed)


def test_host_patterns():
    hosts = ("images.example.com", "*.cdn.example.com", "203.0.113.7")
    assert host_allowed("images.example.com", hosts) and host_allowed("a.b.cdn.example.com", hosts)
    assert not host_allowed("cdn.example.com", hosts) and not host_allowed("evil-images.example.com", hosts)
    assert not host_allowed("images.example.com.evil.net", hosts) and host_allowed("anything.net", ("*",))


class Recorder(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.paths: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


PNG = encoded(Image.new("RGB", (16, 16), (0, 128, 255)), "PNG")


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.server.paths.append(self.path)  # type: ignore[attr-defined]
        if self.path == "/img.png":
            self._send(200, PNG, {"Content-Length": str(len(PNG))})
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


def loopback_fetcher(**kw) -> ImageFetcher:
    """Reaching 127.0.0.1 needs another address rule than the service's: only tests pass one."""
    options = {"hosts": ("127.0.0.1",), "timeout_s": 5.0, "max_bytes": 100_000, "concurrency": 2} | kw
    return ImageFetcher(**options, address_allowed=lambda address: True)


def test_an_allowed_host_with_a_loopback_address_gets_nothing_sent(origin):
    before = len(origin.paths)
    by_name = origin.url.replace("127.0.0.1", "localhost") + "/img.png"
    for hosts, url in ((("127.0.0.1",), origin.url + "/img.png"), (("localhost",), by_name)):
        with pytest.raises(BadRequest) as err:
            fetch(ImageFetcher(hosts, 5.0, 100_000, 2), url)
        assert err.value.code == "image_url_address_refused"
    assert len(origin.paths) == before


def test_hosts_and_schemes_are_checked_before_connecting(origin):
    fetcher = loopback_fetcher()
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
    fetcher = loopback_fetcher()
    assert fetch(fetcher, origin.url + "/img.png") == PNG
    assert fetch(fetcher, origin.url + "/in") == PNG
    with pytest.raises(BadRequest) as err:
        fetch(fetcher, origin.url + "/out")
    assert err.value.code == "image_url_host_not_allowed" and "metadata.internal" in err.value.message
    with pytest.raises(BadRequest, match="redirects more than"):
        fetch(fetcher, origin.url + "/loop")
    with pytest.raises(BadRequest, match="HTTP 404"):
        fetch(fetcher, origin.url + "/missing")
    for odd in (origin.url + "/a b\x00.png", origin.url + "/\u00e9t\u00e9.png"):  # odd paths: a 4xx, never a 5xx
        with pytest.raises(BadRequest):
            fetch(fetcher, odd)
    with pytest.raises(BadRequest, match="not in IMAGE_URL_HOSTS"):
        fetch(fetcher, "http://b\u00fccher.example/a.png")


def test_the_byte_limit_holds_while_streaming(origin):
    fetcher = loopback_fetcher()
    for path in ("/declared", "/stream"):
        with pytest.raises(PayloadTooLarge, match="MAX_IMAGE_BYTES=100000"):
            fetch(fetcher, origin.url + path)


def test_one_deadline_for_the_whole_fetch(origin):
    started = time.perf_counter()
    with pytest.raises(BadRequest) as err:
        fetch(loopback_fetcher(timeout_s=0.5), origin.url + "/slow")  # a byte every 0.1 s: each read is quick
    assert err.value.code == "image_url_timeout" and time.perf_counter() - started < 1.5


def test_concurrent_fetches_are_capped(origin):
    fetcher = loopback_fetcher(concurrency=1, timeout_s=0.5)

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
    for env, words in (({"IMAGE_URLS": "allow"}, "needs IMAGE_URL_HOSTS"), ({"IMAGE_URLS": "yes"}, "deny, allow"),
                       ({"IMAGE_URL_HOSTS": "https://example.com"}, "not a host"),
                       ({"IMAGE_URL_HOSTS": "example.com:8080"}, "not a host"),
                       ({"MAX_IMAGE_PIXELS": "many"}, "not an integer"), ({"IMAGE_URL_TIMEOUT": "0"}, "greater than 0")):
        with pytest.raises(SettingsError, match=words):
            load_settings(base | env)
