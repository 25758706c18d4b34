"""Images in and out of the server: data URLs and uploads -> checked RGB images, images -> base64 PNG.

Only bytes sent with the request are read: remote ``http(s)`` URLs are refused (the server fetches nothing)
and no file path from a client is ever opened.
"""

from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import Image

from cheers.image_ops import ImageTooLarge, open_image
from cheers.serve.errors import APIError

_DATA_URL = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,"
)


def image_from_data_url(url: str, max_pixels: int, param: str) -> Image.Image:
    """``data:image/png;base64,...`` -> RGB image.

    Raises:
        APIError: 400 for remote URLs, other schemes, bad base64 and unreadable or too large images.
    """
    head = url[:16].lower()
    if head.startswith(("http://", "https://")):
        raise APIError(
            400,
            "remote image URLs are not fetched by this server; send the image inline as a data URL "
            "(data:image/png;base64,...)",
            param=param,
            code="remote_url_refused",
        )
    match = _DATA_URL.match(url[:512])
    if match is None or not match.group("b64"):
        raise APIError(
            400,
            "image_url must be a base64 data URL (data:image/png;base64,...)",
            param=param,
            code="bad_url",
        )
    try:
        raw = base64.b64decode(url[match.end() :], validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "the data URL's base64 payload is invalid", param=param, code="bad_url") from None
    return image_from_bytes(raw, max_pixels, param)


def image_from_bytes(raw: bytes, max_pixels: int, param: str) -> Image.Image:
    """Encoded image bytes (PNG, JPEG, WebP, ...) -> RGB image, its size checked before it is decoded."""
    if not raw:
        raise APIError(400, "the image is empty", param=param, code="bad_image")
    try:
        return open_image(io.BytesIO(raw), "the image", max_pixels)
    except ImageTooLarge as err:
        raise APIError(400, str(err), param=param, code="image_too_large") from None
    except ValueError as err:
        raise APIError(400, str(err), param=param, code="bad_image") from None


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def parse_size(size: str | None, default: int, multiple: int, max_side: int) -> tuple[int, int]:
    """``"WxH"`` (or None / ``"auto"``: the model's square size) -> (width, height), checked.

    Raises:
        APIError: 400 naming the rule: a multiple of ``multiple``, at most ``max_side``.
    """
    if size is None or size == "auto":
        return default, default
    match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", size.strip())
    if match is None:
        raise APIError(400, f"size must look like '{default}x{default}', got {size!r:.40}", param="size")
    width, height = int(match.group(1)), int(match.group(2))
    for value in (width, height):
        if value < multiple or value % multiple or value > max_side:
            raise APIError(
                400,
                f"size {width}x{height}: each side must be a multiple of {multiple} between {multiple} and "
                f"{max_side}",
                param="size",
                code="invalid_size",
            )
    return width, height
