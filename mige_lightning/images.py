"""Image decoding that turns every PIL mode into correct RGB (not just ``.convert("RGB")``)."""

from __future__ import annotations

import numpy as np
from PIL import Image

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


class ImageTooLargeError(ValueError):
    pass


def check_image_size(img: Image.Image, path) -> None:
    if img.width * img.height > MAX_IMAGE_PIXELS:
        raise ImageTooLargeError(
            f"image {path} is {img.width}×{img.height} = {img.width * img.height / 1e6:.0f} Mpx; "
            f"the limit is {MAX_IMAGE_PIXELS / 1e6:.0f} Mpx (downscale it first)"
        )


def load_rgb(path) -> Image.Image:
    """Decode fully (so truncated files fail here, with the path) and convert to RGB."""
    with Image.open(path) as img:
        check_image_size(img, path)  # from the header, before any pixel is decoded
        img.load()
        return to_rgb(img)
