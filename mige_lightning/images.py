"""Image decoding that turns every PIL mode into correct RGB (not just ``.convert("RGB")``).

``load_rgb`` (and ``decode_rgb`` for an already opened image, e.g. encoded bytes) is the one reader
of user images — training records, predict requests, benchmarks, the latent cache. It never opens
anything but a regular file (a FIFO would block), refuses from the header what would otherwise be
coerced silently (too many pixels, an extreme aspect ratio, several frames) and turns the image
upright by its EXIF orientation, as image viewers and libraries do.
"""

from __future__ import annotations

import os
import stat

import numpy as np
from PIL import Image, ImageOps

BACKGROUND = (255, 255, 255)  # transparent pixels are composited over white


def to_rgb(img: Image.Image) -> Image.Image:
    """RGBA / LA / P-with-transparency are alpha-composited over white (a plain ``convert`` would
    expose whatever colour hides under transparent pixels); 16-/32-bit greyscale is rescaled to
    8 bits instead of being clipped at 255; CMYK and the rest go through PIL's conversions."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            scale = 65535.0
        elif img.mode == "F":
            scale = 1.0
        else:
            scale = 65535.0 if arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


# larger images are refused before decoding (a 169-Mpx file took 3 GB to validate); a 512-px model
# never needs more, and real datasets stay far below (8K UHD is 33 Mpx)
MAX_IMAGE_PIXELS = 40_000_000
# longer side / shorter side: beyond it an image is mostly cropped away (the VAE path's centre crop)
# or squashed to a sliver (the vision tower's square resize); panoramas stay within 4:1 to 6:1
MAX_ASPECT_RATIO = 8
# EXIF orientations that turn the stored image by 90° or 270° (its upright size swaps width and height)
_TURNED = (5, 6, 7, 8)


class ImageRefusedError(ValueError):
    """An image refused before decoding; ``kind`` names the reason (bad-record counts)."""

    kind = "refused image"


class ImageTooLargeError(ImageRefusedError):
    kind = "image too large"


class ImageAspectError(ImageRefusedError):
    kind = "extreme aspect ratio"


class ImageFramesError(ImageRefusedError):
    kind = "multi-frame image"


class NotARegularFileError(OSError):
    """A path that is a FIFO, socket or device (never opened: reading a FIFO blocks)."""


def not_a_regular_file(path) -> str | None:
    """Why ``path`` cannot be read as a file, or None for a regular file: ``"does not exist"``
    (also through a broken symbolic link), ``"is a directory, not a file"``, ``"is not a regular
    file (a FIFO / named pipe)"``, … Only ``stat`` is used: nothing is opened."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist (a broken symbolic link)" if os.path.islink(path) else "does not exist"
    except NotADirectoryError:
        return "does not exist (a folder on its path is a file)"
    except OSError as e:
        return f"cannot be read: {e.strerror}"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    for test, name in (
        (stat.S_ISFIFO, "a FIFO / named pipe"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return f"is not a regular file ({name})"
    return "is not a regular file"


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as shown, from the header: swapped when the EXIF orientation turns the
    image by 90°. (A PNG whose header holds no EXIF chunk is taken as upright: PIL would decode
    the whole image looking for one further on.)"""
    if img.format == "PNG" and "exif" not in img.info:
        return img.size
    turned = img.getexif().get(0x0112) in _TURNED  # the Orientation tag
    return (img.height, img.width) if turned else (img.width, img.height)


def check_image_size(img: Image.Image, path) -> None:
    """From the header, before any pixel is decoded: the pixel and aspect-ratio limits (neither
    depends on the EXIF orientation: the size is given as stored)."""
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLargeError(
            f"image {path} is {width}×{height} = {width * height / 1e6:.0f} Mpx; "
            f"the limit is {MAX_IMAGE_PIXELS / 1e6:.0f} Mpx (downscale it first)"
        )
    ratio = max(width, height) / max(min(width, height), 1)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageAspectError(
            f"image {path} is {width}×{height} (aspect ratio {ratio:.1f}:1); the limit is "
            f"{MAX_ASPECT_RATIO}:1 (training crops it to a square, the vision tower squashes it) — crop it first"
        )


def check_frames(img: Image.Image, path) -> None:
    """An animated GIF / APNG / WebP or a multi-page TIFF is refused: using its first frame
    silently would train on (or condition on) an image nobody chose. A camera JPEG carrying
    previews or a second view (MPO) is a still photo: its first frame is the picture."""
    if img.format == "MPO":
        return
    if getattr(img, "is_animated", False):  # more than one frame (each plugin that has frames says)
        raise ImageFramesError(
            f"image {path} has {img.n_frames} frames (animated or multi-page); a single still image "
            "is expected — save the frame you mean as its own file"
        )


def decode_rgb(img: Image.Image, name) -> Image.Image:
    """An opened image → upright RGB: header checks (size, aspect ratio, frames), a full decode
    (a truncated file fails here, named ``name``), the EXIF orientation applied, then ``to_rgb``."""
    check_image_size(img, name)
    check_frames(img, name)
    img.load()
    ImageOps.exif_transpose(img, in_place=True)  # as shown (no copy when already upright)
    return to_rgb(img)


def load_rgb(path) -> Image.Image:
    """Decode a regular file fully (see ``decode_rgb``) and convert to RGB, upright."""
    why = not_a_regular_file(path)
    if why is not None:
        if why.startswith("does not exist"):
            raise FileNotFoundError(f"missing file {path}{why.removeprefix('does not exist')}")
        if why.startswith("is a directory"):
            raise IsADirectoryError(f"{path} {why}")
        raise NotARegularFileError(f"{path} {why}")
    with Image.open(path) as img:
        return decode_rgb(img, path)
