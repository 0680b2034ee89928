"""Images from requests, checked before anything decodes them (DESIGN: inputs from users are
hostile until checked). Every image, whether sent inline or fetched (runners.capabilities.image_urls):

1. its size in bytes is bounded (MAX_IMAGE_BYTES): a data URI's base64 length is checked before the
   base64 is decoded; a fetch stops reading past the limit;
2. its format is sniffed from its first bytes: PNG, JPEG, WebP or GIF, whatever the URI or the
   server says it is (Pillow is told to try that format only);
3. its width and height are read from the header, and an image over MAX_IMAGE_PIXELS (16.7 MP by
   default, Pillow's own limit is 89.5 MP and only warns) is refused before a pixel is decoded: a
   50-megapixel PNG of a few kilobytes is a 413, not 150 MB of memory. The model's processor is
   held to the same limit (CLIP's scales the shorter side up: a 1 x 20,000 strip would become
   32 x 640,000 pixels);
4. a JPEG's scans are counted before it decodes (MAX_JPEG_SCANS): each scan of a progressive JPEG
   is another pass over the whole image, so a flat 2048 x 2048 JPEG with a 16-byte scan repeated
   thousands of times is minutes of CPU from a few megabytes; a normal progressive JPEG has ~10;
5. it is decoded (the first frame of an animation), converted to RGB and put through the model's
   own processor in a thread of the image pool (runners.capabilities.image_embed), never the
   default executor that tokenizes texts; only the processed tensor is kept.

Whatever fails is a 4xx that names the input (`input[3]`, `images[0]`, `inputs[2].content[1]`):
never a 5xx, and never the other requests' concern, because nothing of this runs in a batch.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from typing import Any

from runners.errors import BadRequest, PayloadTooLarge

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
DATA_URI_TYPES = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP", "gif": "GIF"}
_DATA_URI = re.compile(r"data:image/([a-z0-9.+-]+)((?:;[a-z0-9._=-]+)*);base64,", re.IGNORECASE)
_SCHEME = re.compile(r"([a-z][a-z0-9+.-]*):", re.IGNORECASE)
_BASE64_CHARS = re.compile(r"[A-Za-z0-9+/=_-]+")
HOW_TO_SEND = "send data:image/png;base64,... (or jpeg, webp, gif)"
# libjpeg's progressive JPEGs have 6 (gray) to 10 scans, mozjpeg's about 12; a hand-written scan
# script has at most a few dozen. Each scan costs a pass over the image, so this bounds the CPU.
MAX_JPEG_SCANS = 64
# The end of a JPEG's entropy-coded data: an 0xFF that is not a stuffed 0x00 nor a restart marker.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")


@dataclass
class DecodedImage:
    """A decoded RGB image and what Cohere's response says of it."""

    image: Any  # PIL.Image.Image, mode RGB
    format: str
    width: int
    height: int
    bit_depth: int

    def describe(self) -> dict[str, Any]:
        return {"width": self.width, "height": self.height, "format": self.format.lower(), "bit_depth": self.bit_depth}


def is_url(value: str) -> bool:
    """Anything with a scheme other than `data:` is a URL (only http and https are ever fetched)."""
    match = _SCHEME.match(value)
    return match is not None and match.group(1).lower() != "data" and value[match.end():match.end() + 2] == "//"


def inline_bytes(value: str, where: str, max_bytes: int) -> bytes:
    """The bytes of a `data:image/<type>;base64,` URI, or of bare base64 (as Jina's API takes it); the
    size is checked on the base64 text before anything is decoded."""
    payload = value
    if value[:5].lower() == "data:":
        match = _DATA_URI.match(value)
        if match is None:
            declared = value[5:60].split(",")[0]
            raise BadRequest(f"{where} is a data URI of {declared!r}, not a base64 image: {HOW_TO_SEND}",
                             param=where, code="invalid_image")
        kind = match.group(1).lower()
        if kind not in DATA_URI_TYPES:
            raise BadRequest(f"{where} is a data:image/{kind} URI: the images served are PNG, JPEG, WebP and GIF",
                             param=where, code="unsupported_image_format")
        payload = value[match.end():]
    size = len(payload) * 3 // 4
    if size > max_bytes:
        raise PayloadTooLarge(f"{where} holds about {size} bytes of image; the limit is MAX_IMAGE_BYTES={max_bytes}: "
                              "send a smaller image", param=where, code="image_too_large")
    if not _BASE64_CHARS.fullmatch(payload):
        payload = payload.replace("\r", "").replace("\n", "")  # base64 wrapped over lines
    if not payload or not _BASE64_CHARS.fullmatch(payload):
        raise BadRequest(f"{where} is neither a data:image/...;base64 URI nor base64 image data: {HOW_TO_SEND}",
                         param=where, code="invalid_image")
    try:
        if "-" in payload or "_" in payload:
            return base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where}: its base64 does not decode: {HOW_TO_SEND}", param=where,
                         code="invalid_image") from None


def sniff(data: bytes) -> str | None:
    """PNG, JPEG, WEBP or GIF by the file's magic bytes; None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def jpeg_scans(data: bytes | memoryview, stop_after: int = MAX_JPEG_SCANS) -> int:
    """The number of scans (SOS markers) of a JPEG, found by walking its segments: a segment is
    skipped by its length (so the markers of an EXIF thumbnail inside APP1 are not counted) and a
    scan's entropy-coded data by a compiled search for the next marker (C speed on 10 MB). Stops
    counting past `stop_after`; a truncated file gives the scans seen so far (decoding reports it)."""
    view = memoryview(data)
    size, pos, scans = len(data), 2, 0  # past SOI
    while pos + 1 < size and scans <= stop_after:
        if data[pos] != 0xFF:
            return scans  # not at a marker: corrupt, and the decoder says so
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        pos += 2
        if marker == 0xD9:  # EOI
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # segments without a length
            continue
        if pos + 2 > size:
            break
        pos += (data[pos] << 8) | data[pos + 1]
        if marker == 0xDA:  # SOS: its header, then entropy-coded data up to the next real marker
            scans += 1
            found = _JPEG_MARKER.search(view, pos)
            if found is None:
                break
            pos = found.start()
    return scans


_BIT_DEPTHS = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I": 32, "F": 32}


def decode(data: bytes | io.BytesIO, where: str, max_pixels: int, resized_pixels: Any = None) -> DecodedImage:
    """Sniff, check the header's size, then decode (blocking: run it in a worker thread). A fetched
    image comes as the BytesIO it was written into, read where it lies (never copied).

    `resized_pixels(width, height)` is the model processor's intermediate size, held to the same limit."""
    stream = data if isinstance(data, io.BytesIO) else io.BytesIO(data)
    view = stream.getbuffer()
    try:
        return _decode(stream, view, where, max_pixels, resized_pixels)
    finally:
        view.release()


def _decode(stream: io.BytesIO, view: memoryview, where: str, max_pixels: int, resized_pixels: Any) -> DecodedImage:
    from PIL import Image

    kind = sniff(bytes(view[:16]))
    if kind is None:
        raise BadRequest(f"{where} is not a PNG, JPEG, WebP or GIF image (by its first bytes): {HOW_TO_SEND}",
                         param=where, code="invalid_image")
    try:
        image = Image.open(stream, formats=[kind])  # reads the header only
        width, height = image.size
    except Image.DecompressionBombError:
        raise _too_many_pixels(where, None, None, max_pixels) from None
    except Exception as exc:  # noqa: BLE001 - whatever Pillow says of a broken header, it is the input's fault
        raise BadRequest(f"{where} is not a readable {kind} image ({_reason(exc)})", param=where,
                         code="invalid_image") from None
    if width < 1 or height < 1 or width * height > max_pixels:
        raise _too_many_pixels(where, width, height, max_pixels)
    if resized_pixels is not None and resized_pixels(width, height) > max_pixels:
        raise PayloadTooLarge(
            f"{where} is {width} x {height} pixels, too elongated: the model's processor would scale it to "
            f"{resized_pixels(width, height)} pixels (MAX_IMAGE_PIXELS={max_pixels}): crop it closer to a square",
            param=where, code="image_too_large")
    if kind == "JPEG":
        scans = jpeg_scans(view)
        if scans > MAX_JPEG_SCANS:
            image.close()
            raise BadRequest(f"{where} is a JPEG of more than MAX_JPEG_SCANS={MAX_JPEG_SCANS} scans (a progressive JPEG "
                             "has about 10; each costs a pass over the image): re-encode it as a baseline JPEG or PNG",
                             param=where, code="image_too_complex")
    mode = image.mode
    try:
        image.load()  # the first frame of an animation
        rgb = image.convert("RGB")
    except Image.DecompressionBombError:
        raise _too_many_pixels(where, width, height, max_pixels) from None
    except Exception as exc:  # noqa: BLE001 - truncated, corrupt, or a mode Pillow cannot convert
        raise BadRequest(f"{where} is a {kind} image that does not decode ({_reason(exc)})", param=where,
                         code="invalid_image") from None
    finally:
        image.close()
    return DecodedImage(rgb, kind, width, height, _BIT_DEPTHS.get(mode, 8))


def _too_many_pixels(where: str, width: int | None, height: int | None, max_pixels: int) -> PayloadTooLarge:
    size = f"{width} x {height} pixels" if width is not None else "larger than Pillow decodes"
    return PayloadTooLarge(f"{where} is {size}; the limit is MAX_IMAGE_PIXELS={max_pixels}: send a smaller image "
                           "(the model reads a few hundred pixels a side)", param=where, code="image_too_large")


def _reason(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text[:200]
