"""Image preprocessing for Cheers: any image-like input -> (3, R, R) float32 in [0, 1].

Two geometries (reference §12), both with PIL bicubic resampling and no mean/std normalisation:

* understanding (:func:`preprocess_understanding`): scale by ``min(R/h, R/w)``, pad to R×R with black,
  centred (left/top = pad // 2);
* generation target (:func:`preprocess_generation`): scale the short side to R, centre-crop R×R
  (torchvision ``Resize(R)`` + ``CenterCrop(R)`` conventions: the long side is truncated, the crop
  offset is ``round((size - R) / 2)``).

Accepted inputs and how they are normalised to RGB:

* PIL images. ``RGB`` as is; every 8-bit mode (``L``, ``LA``, ``P``, ``RGBA``, ``CMYK``, ``1`` ...)
  through ``.convert("RGB")`` as the release does, which **drops alpha** (colour under transparent
  pixels shows through; palette transparency likewise). 16-bit modes (``I;16*``, and ``I`` with values
  above 255) are scaled by 1/65535 instead of being saturated at 255 as ``.convert("RGB")`` would;
  ``F`` images must hold values in [0, 1].
* numpy arrays: HWC or HW, ``uint8`` (0..255), ``uint16`` (0..65535) or floating ([0, 1]).
* torch tensors: CHW or HW, ``uint8`` or floating ([0, 1]).

1 or 2 channels are read as grey (+ alpha), 4 as RGBA; alpha is dropped. 8-bit inputs follow the
release exactly (uint8 resize, rounding included). Floating and 16-bit inputs are resized per channel
in PIL's float mode (same bicubic filter, no 8-bit rounding) and clamped to [0, 1].
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, BinaryIO, Union

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

ImageLike = Union[Image.Image, np.ndarray, torch.Tensor]  # noqa: UP007 - runtime alias

DUMMY_SOURCE_SIZE = 256
"""Side of the release's random dummy image before it is resized to the processor resolution."""

_FLOAT_TOLERANCE = 1e-4  # floats this far outside [0, 1] are clamped, further is an error
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

# An image on its way through the pipeline: an RGB PIL image (8-bit path) or an (H, W, 3) float32
# array in [0, 1] (float path).
_Canvas = Union[Image.Image, np.ndarray]  # noqa: UP007


def to_canvas(image: Any) -> _Canvas:
    """Normalise an image-like object to RGB (see the module docstring for the rules).

    Args:
        image: PIL image, numpy array (HWC/HW) or torch tensor (CHW/HW).

    Returns:
        An RGB PIL image (8-bit inputs) or an (H, W, 3) float32 array in [0, 1].

    Raises:
        ValueError: zero-size images, unsupported channel counts, dtypes or modes, values out of range,
            non-image objects.
    """
    if isinstance(image, Image.Image):
        canvas = _pil_to_canvas(image)
    elif isinstance(image, torch.Tensor):
        canvas = _tensor_to_canvas(image)
    elif isinstance(image, np.ndarray):
        canvas = _array_to_canvas(image, layout="HWC")
    else:
        raise ValueError(
            f"expected a PIL image, numpy array or torch tensor, got {type(image).__name__}: {image!r:.80}"
        )
    width, height = _size(canvas)
    if width == 0 or height == 0:
        raise ValueError(f"image has zero size (width={width}, height={height})")
    return canvas


def preprocess_understanding(image: Any, resolution: int = 512) -> torch.Tensor:
    """Scale to fit inside R×R keeping the aspect ratio, pad with black, centred.

    Args:
        image: any input :func:`to_canvas` accepts.
        resolution: R, the output side.

    Returns:
        (3, R, R) float32 in [0, 1].
    """
    canvas = to_canvas(image)
    width, height = _size(canvas)
    scale = min(resolution / height, resolution / width)
    # round(), not int(): int(384 * (512 / 384)) is 511.
    new_w = min(resolution, max(1, round(width * scale)))
    new_h = min(resolution, max(1, round(height * scale)))
    content = _to_chw(_resize(canvas, new_w, new_h))  # (3, new_h, new_w)
    out = torch.zeros(3, resolution, resolution, dtype=torch.float32)  # (3, R, R) black
    top, left = (resolution - new_h) // 2, (resolution - new_w) // 2
    out[:, top : top + new_h, left : left + new_w] = content
    return out


def preprocess_generation(image: Any, resolution: int = 512) -> torch.Tensor:
    """Scale the short side to R and centre-crop R×R (a generation / editing target).

    Args:
        image: any input :func:`to_canvas` accepts.
        resolution: R, the output side.

    Returns:
        (3, R, R) float32 in [0, 1].
    """
    canvas = to_canvas(image)
    width, height = _size(canvas)
    if width <= height:
        new_w, new_h = resolution, max(resolution, int(resolution * height / width))
    else:
        new_w, new_h = max(resolution, int(resolution * width / height)), resolution
    resized = _to_chw(_resize(canvas, new_w, new_h))  # (3, new_h, new_w)
    top, left = int(round((new_h - resolution) / 2.0)), int(round((new_w - resolution) / 2.0))
    return resized[:, top : top + resolution, left : left + resolution].contiguous()  # (3, R, R)


def dummy_image(generator: torch.Generator | None = None, resolution: int = 512) -> torch.Tensor:
    """The release's stand-in image for prompts without one (reference §10.2).

    A 256×256 RGB image of uniform random bytes (drawn HWC from ``generator``; the release draws it
    unseeded), resized bicubically to R×R with PIL, divided by 255.

    Args:
        generator: source of the random bytes; ``None`` uses torch's global generator.
        resolution: R, the output side.

    Returns:
        (3, R, R) float32 in [0, 1].
    """
    size = (DUMMY_SOURCE_SIZE, DUMMY_SOURCE_SIZE, 3)
    noise = torch.randint(0, 256, size, generator=generator, dtype=torch.uint8)  # (256, 256, 3)
    canvas = Image.fromarray(noise.numpy())
    return _to_chw(_resize(canvas, resolution, resolution))  # (3, R, R)


# --------------------------------------------------------------------------------------------------
# normalisation


def _pil_to_canvas(image: Image.Image) -> _Canvas:
    mode = image.mode
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image has zero size (width={image.width}, height={image.height})")
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        return _grey_float(np.asarray(image, dtype=np.float32) / 65535.0)
    if mode == "I":
        values = np.asarray(image, dtype=np.int64)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise ValueError(f"32-bit integer image holds values in [{low}, {high}]; expected 0..65535")
        if high <= 255:
            return Image.fromarray(values.astype(np.uint8)).convert("RGB")
        return _grey_float(values.astype(np.float32) / 65535.0)
    if mode == "F":
        return _grey_float(_checked_float(np.asarray(image, dtype=np.float32)))
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # the direct P -> RGB conversion warns about byte transparency
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise ValueError(f"cannot convert a PIL image of mode {mode!r} to RGB: {err}") from err


def _tensor_to_canvas(tensor: torch.Tensor) -> _Canvas:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.uint8:
        array = tensor.numpy()
    elif tensor.is_floating_point():
        array = tensor.to(torch.float32).numpy()
    else:
        raise ValueError(f"image tensor must be uint8 or floating, got dtype {tensor.dtype}")
    if array.ndim == 3:
        if array.shape[0] not in (1, 2, 3, 4):
            raise ValueError(f"image tensor must be CHW with 1-4 channels, got shape {tuple(tensor.shape)}")
        array = np.moveaxis(array, 0, -1)  # (H, W, C)
    return _array_to_canvas(array, layout="CHW")


def _array_to_canvas(array: np.ndarray, layout: str) -> _Canvas:
    shape = tuple(array.shape)
    if array.ndim == 2:
        array = array[:, :, None]  # (H, W, 1)
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"image array must be {layout} or HW with 1-4 channels, got shape {shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image has zero size (shape {shape})")
    channels = array.shape[-1]
    rgb = np.repeat(array[..., :1], 3, axis=-1) if channels <= 2 else array[..., :3]  # (H, W, 3)
    if array.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(rgb))
    if array.dtype == np.uint16:
        return rgb.astype(np.float32) / 65535.0
    if np.issubdtype(array.dtype, np.floating):
        return _checked_float(rgb.astype(np.float32))
    raise ValueError(f"image array dtype must be uint8, uint16 or floating, got {array.dtype}")


def _checked_float(values: np.ndarray) -> np.ndarray:
    if values.size and not np.isfinite(values).all():
        raise ValueError("floating image holds NaN or infinite values")
    if values.size:
        low, high = float(values.min()), float(values.max())
        if low < -_FLOAT_TOLERANCE or high > 1 + _FLOAT_TOLERANCE:
            raise ValueError(f"floating image values must lie in [0, 1], got [{low:.4g}, {high:.4g}]")
    return np.clip(values, 0.0, 1.0)


def _grey_float(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[:, :, None], 3, axis=-1)  # (H, W) -> (H, W, 3)


# --------------------------------------------------------------------------------------------------
# geometry on either canvas kind


def _size(canvas: _Canvas) -> tuple[int, int]:
    """(width, height)."""
    if isinstance(canvas, Image.Image):
        return canvas.size
    return canvas.shape[1], canvas.shape[0]


def _resize(canvas: _Canvas, width: int, height: int) -> _Canvas:
    if isinstance(canvas, Image.Image):
        return canvas.resize((width, height), Image.Resampling.BICUBIC)
    # Float path: PIL's "F" mode resizes one channel at a time with the same bicubic filter.
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(canvas[:, :, c])).resize(
                (width, height), Image.Resampling.BICUBIC
            )
        )
        for c in range(3)
    ]
    return np.clip(np.stack(channels, axis=-1), 0.0, 1.0)  # (height, width, 3)


def _to_chw(canvas: _Canvas) -> torch.Tensor:
    if isinstance(canvas, Image.Image):
        array = np.asarray(canvas, dtype=np.float32) / 255.0
    else:
        array = canvas.astype(np.float32, copy=False)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))  # (3, H, W)


def check_resolution(resolution: int, patch_size: int) -> None:
    """Raise ``ValueError`` unless ``resolution`` is a positive multiple of ``patch_size``."""
    for name, value in (("image_size", resolution), ("patch_size", patch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if resolution % patch_size:
        raise ValueError(
            f"image_size={resolution} is not a multiple of patch_size={patch_size} "
            f"(nearest: {math.floor(resolution / patch_size) * patch_size})"
        )


MAX_IMAGE_PIXELS = 64_000_000  # larger files are refused rather than decoded (decompression bombs)


class ImageTooLarge(ValueError):
    """An image with more pixels than allowed (refused before it is decoded)."""


def load_image(path: str | Path) -> Image.Image:
    """Open an image file fully (so a truncated file fails here, not later), as RGB.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an image, corrupt or truncated, zero-size, or larger than ``MAX_IMAGE_PIXELS``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image file at {path}")
    return open_image(path, str(path))


def open_image(source: str | Path | BinaryIO, name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image file or stream fully, as RGB; ``name`` is what error messages call it.

    Raises:
        ImageTooLarge: more than ``max_pixels`` pixels (checked from the header, before decoding).
        ValueError: not an image, corrupt or truncated, or zero-size.
    """
    try:
        with Image.open(source) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageTooLarge(
                    f"{name} is {width}x{height} pixels, more than the {max_pixels:,} allowed"
                )
            if width == 0 or height == 0:
                raise ValueError(f"{name} has zero size ({width}x{height})")
            img.load()
            return img.convert("RGB") if img.mode != "RGB" else img.copy()
    except ValueError:
        raise
    except (OSError, Image.DecompressionBombError, SyntaxError) as err:
        raise ValueError(f"{name} is not a readable image ({type(err).__name__}: {err})") from None
