"""The one image decoder: an X-ray file (PNG, JPEG, TIFF, ... or DICOM) -> a (size, size) uint8 grey array.

Training (the decode-once cache, `vkd_pyro.data.image_cache`) and `vkd-pyro predict`
(`vkd_pyro.analysis.runs.load_images`) both call :func:`decode_image` and then :func:`to_unit_float`, so a
file gives the same tensor whichever path reads it. The contract:

- 8-bit grey images are taken as they are. Multi-page files (a TIFF of several pages, an animated
  GIF or PNG: Pillow's `n_frames` > 1) are refused, as multi-frame DICOMs are: which page is the
  radiograph is not for the decoder to guess. Colour images (RGB, RGBA, palette, CMYK, ...) are
  turned into grey with Pillow's luma (L = 0.299 R + 0.587 G + 0.114 B; alpha is ignored), not refused:
  ChestX-ray14 and other releases ship some radiographs as RGB(A) copies of a grey image.
- Integer images of more than 8 bits (16-bit PNG and TIFF, mode I) are scaled by their significant
  bit depth: the smallest depth of at least 8 bits that holds the image's largest value (a 12-bit
  radiograph stored in a 16-bit PNG is divided by 4095, not 65535, nor stretched to its own
  min..max), so that it and its 8-bit rendering decode alike. Images with negative values, and
  float images outside [0, 1], are stretched from their minimum..maximum; float images in [0, 1]
  are multiplied by 255.
- DICOM files (by extension .dcm/.dicom or the DICM preamble) are read with pydicom, an optional
  dependency (`pip install vkd-pyro[dicom]`; without it a DICOM input is a UserError saying so).
  The Modality LUT or RescaleSlope/RescaleIntercept and then the VOI LUT or window
  (WindowCenter/WindowWidth, the first one) are applied with pydicom, and the result is scaled from
  the output range those define (from BitsStored and PixelRepresentation, as pydicom's windowing
  does) to 0..255; a negative slope therefore inverts. MONOCHROME1 images are inverted so that
  bone is bright as in MONOCHROME2. Multi-frame files are refused; 8-bit colour DICOMs use the luma.
- The grey image is resized to size x size with Pillow's bilinear (antialiased) filter, without
  keeping the aspect ratio. Large JPEGs are decoded at the smallest DCT scale that still gives at
  least 2 * size pixels a side.

Failures raise :class:`BadImage` with a `reason` (what datasets count skipped records under) and a
detail: "image file missing", "unreadable image (corrupt or truncated)", "image too large" (more
pixels than `max_pixels()`, checked from the header before anything is decoded: a decompression
bomb), "unsupported image".
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from vkd_pyro.errors import UserError

#: File name endings read as DICOM (files with the DICM preamble are too, whatever their name).
DICOM_SUFFIXES = (".dcm", ".dicom")
#: The pixel limit when Pillow's own (PIL.Image.MAX_IMAGE_PIXELS) is switched off (None).
DEFAULT_MAX_PIXELS = 2**28

MISSING = "image file missing"
UNREADABLE = "unreadable image (corrupt or truncated)"
TOO_LARGE = "image too large"
UNSUPPORTED = "unsupported image"


class BadImage(Exception):
    """A file that cannot be used as an image; `reason` is the skip reason it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}{f' ({detail})' if detail else ''}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # picklable with both arguments (decoding runs in worker processes)
        return (type(self), (self.reason, self.detail))


def max_pixels() -> int:
    """The most pixels an image may have: Pillow's MAX_IMAGE_PIXELS (DEFAULT_MAX_PIXELS when None)."""
    return int(Image.MAX_IMAGE_PIXELS or DEFAULT_MAX_PIXELS)


def _check_pixels(width: int, height: int, frames: int = 1) -> None:
    limit = max_pixels()
    if width * height * frames > limit:
        raise BadImage(TOO_LARGE, f"{width} x {height} pixels{f' x {frames} frames' if frames > 1 else ''} "
                                  f"declared; the limit is {limit} (PIL.Image.MAX_IMAGE_PIXELS)")


def is_dicom(path: str | os.PathLike) -> bool:
    """Whether `path` is read as DICOM: a .dcm/.dicom name, or 'DICM' at byte 128 (the preamble)."""
    if str(path).lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _scale_to_grey8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """`values` mapped linearly from lo..hi to 0..255 (clipped, rounded) as uint8; 0 when lo == hi."""
    if hi == lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _high_depth_to_grey8(values: np.ndarray) -> np.ndarray:
    """Integer or float pixel values of more than 8 bits as uint8 (see the module docstring)."""
    if values.size == 0:
        return values.astype(np.uint8)
    lo, hi = float(values.min()), float(values.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise BadImage(UNREADABLE, "non-finite pixel values")
    if np.issubdtype(values.dtype, np.integer) and lo >= 0:
        bits = max(8, int(hi).bit_length())
        return _scale_to_grey8(values, 0.0, float(2**bits - 1))
    if np.issubdtype(values.dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
        return _scale_to_grey8(values, 0.0, 1.0)
    return _scale_to_grey8(values, lo, hi)


def pillow_to_grey8(image) -> np.ndarray:
    """A loaded Pillow image as an (H, W) uint8 grey array (see the module docstring)."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        return _high_depth_to_grey8(np.asarray(image))
    try:
        return np.asarray(image.convert("L"), dtype=np.uint8)
    except (ValueError, OSError) as exc:
        raise BadImage(UNSUPPORTED, f"Pillow mode {image.mode}: {exc}") from None


def _read_pillow(path: str | os.PathLike, size: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, by size
        with Image.open(path) as image:
            _check_pixels(*image.size)
            pages = getattr(image, "n_frames", 1)
            if pages > 1:
                raise BadImage(UNSUPPORTED, f"multi-page {image.format} image ({pages} pages)")
            if image.format == "JPEG":
                image.draft("L", (2 * size, 2 * size))
            image.load()
            return pillow_to_grey8(image)


def _pydicom():
    """pydicom and its LUT functions, or None: an optional dependency (`pip install vkd-pyro[dicom]`)."""
    try:
        import pydicom  # optional: only DICOM input needs it
    except ImportError:
        return None
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut  # optional, as above
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut  # optional, as above
    return pydicom, apply_modality_lut, apply_voi_lut


def _dicom_output_range(ds) -> tuple[float, float]:
    """The range of the Modality LUT / rescale output (and of a window's output), as pydicom's
    windowing computes it: from the Modality LUT's bit depth, else BitsStored and PixelRepresentation,
    mapped through RescaleSlope/RescaleIntercept; sorted."""
    bits = int(ds.BitsStored)
    if ds.get("ModalityLUTSequence"):
        lo, hi = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation", 0)) == 0:
        lo, hi = 0.0, float(2**bits - 1)
    else:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
    return min(lo, hi), max(lo, hi)


def read_dicom_grey8(path: str | os.PathLike) -> np.ndarray:
    """A DICOM file as an (H, W) uint8 grey array (see the module docstring); UserError without pydicom."""
    modules = _pydicom()
    if modules is None:
        raise UserError(f"{path}: a DICOM file; reading DICOM needs pydicom: pip install vkd-pyro[dicom]")
    pydicom, apply_modality_lut, apply_voi_lut = modules
    try:
        ds = pydicom.dcmread(str(path), force=True)
    except FileNotFoundError:
        raise BadImage(MISSING, str(path)) from None
    except Exception as exc:  # pydicom raises InvalidDicomError, EOFError, struct.error, ...
        raise BadImage(UNREADABLE, f"DICOM: {type(exc).__name__}: {exc}") from None
    if "PixelData" not in ds:
        raise BadImage(UNREADABLE, "DICOM without PixelData")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        photometric = str(ds.PhotometricInterpretation).strip().upper()
        int(ds.BitsStored)
    except Exception as exc:
        raise BadImage(UNREADABLE, f"DICOM header: {type(exc).__name__}: {exc}") from None
    _check_pixels(columns, rows, frames)
    if frames > 1:
        raise BadImage(UNSUPPORTED, f"multi-frame DICOM ({frames} frames)")
    try:
        pixels = ds.pixel_array
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            if pixels.ndim != 3 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
                raise BadImage(UNSUPPORTED, f"DICOM {photometric} with {ds.SamplesPerPixel} samples "
                                            f"of {ds.BitsAllocated} bits")
            return np.asarray(Image.fromarray(pixels).convert("L"), dtype=np.uint8)
        values = apply_modality_lut(pixels, ds)
        if ds.get("VOILUTSequence"):
            lo, hi = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
            values = apply_voi_lut(values, ds, index=0)
        else:
            lo, hi = _dicom_output_range(ds)
            if "WindowCenter" in ds and "WindowWidth" in ds:
                values = apply_voi_lut(values, ds, index=0)
    except BadImage:
        raise
    except Exception as exc:  # a truncated or compressed PixelData without a decoder, a bad LUT, ...
        raise BadImage(UNREADABLE, f"DICOM pixels: {type(exc).__name__}: {exc}") from None
    grey = _scale_to_grey8(np.asarray(values, dtype=np.float64), lo, hi)
    return 255 - grey if photometric == "MONOCHROME1" else grey


def read_grey8(path: str | os.PathLike, size: int) -> np.ndarray:
    """The file at `path` as an (H, W) uint8 grey array at (about) full resolution, before resizing
    (`size` only sets the JPEG draft scale). Raises BadImage, or UserError for DICOM without pydicom."""
    if not Path(path).exists():
        raise BadImage(MISSING, str(path))
    if is_dicom(path):
        return read_dicom_grey8(path)
    try:
        return _read_pillow(path, size)
    except (BadImage, UserError):
        raise
    except FileNotFoundError:
        raise BadImage(MISSING, str(path)) from None
    except Image.DecompressionBombError as exc:
        raise BadImage(TOO_LARGE, str(exc)) from None
    except MemoryError:
        raise BadImage(TOO_LARGE, "out of memory while decoding") from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, zlib.error, ...
        raise BadImage(UNREADABLE, f"{type(exc).__name__}: {exc}") from None


def decode_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """The image file at `path` as a (size, size) uint8 grey array: `read_grey8`, then a bilinear
    (antialiased) resize to size x size. Raises BadImage with a reason, or UserError (DICOM without
    pydicom)."""
    grey = read_grey8(path, size)
    if grey.ndim != 2 or grey.size == 0:
        raise BadImage(UNSUPPORTED, f"pixel array of shape {tuple(grey.shape)}")
    resized = Image.fromarray(np.ascontiguousarray(grey)).resize((int(size), int(size)), Image.BILINEAR)
    return np.asarray(resized, dtype=np.uint8).copy()


def to_unit_float(grey: np.ndarray) -> np.ndarray:
    """A uint8 grey array as float32 in [0, 1] (divided by 255): what models see, in training and predict."""
    return np.true_divide(grey, np.float32(255.0), dtype=np.float32)
