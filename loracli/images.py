"""Reading real-world images safely: EXIF rotation, transparency, CMYK/greyscale/16-bit, bombs.

Shared by captioning and training, so both see an image the same way.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from loracli.errors import LoraError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MAX_PIXELS = 100_000_000  # ~10k x 10k; anything bigger is treated as a decompression bomb


class ImageError(LoraError):
    """One image could not be used; callers usually skip it with a warning."""


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def find_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in `folder` (sorted, hidden files and non-images ignored)."""
    folder = Path(folder)
    if not folder.exists():
        raise LoraError(f"{folder}: no such folder", "check the path; it should hold your images")
    if not folder.is_dir():
        raise LoraError(f"{folder}: not a folder", "pass the folder that holds your images")
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in pattern if p.is_file() and is_image(p)
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def load_rgb(path: Path):
    """Open an image as 8-bit RGB, upright, transparency flattened onto white.

    Raises `ImageError` for empty, unreadable, truncated or oversized (bomb) files.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: empty file (0 bytes)")
        with warnings.catch_warnings():  # PIL warns above 89 MP; MAX_PIXELS below decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise ImageError(f"{path}: {w}x{h} is too large ({w * h:,} pixels); "
                                 f"refusing a possible decompression bomb",
                                 "downscale it below 100 megapixels")
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def _to_rgb(im):
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        im = Image.fromarray((arr / top * 255.0).clip(0, 255).astype("uint8"), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")
