"""JPEG encoding and decoding shared by the services that make or read frames (producers, edge, cloud, replay)."""

import ctypes

import cv2
import numpy as np
import simplejpeg

# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
IMAGE_MMAP_THRESHOLD_BYTES = 16 * 1024 * 1024
IMAGE_TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024


CAMERA_JPEG_QUALITY = 85  # a camera's default (producers' jpeg_quality)


def encode_jpeg(image_bgr: np.ndarray, quality: int = CAMERA_JPEG_QUALITY) -> bytes:
    """JPEG bytes of an HxWx3 BGR (OpenCV's order) or HxW grey image; ValueError when OpenCV cannot encode it."""
    ok, buffer = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buffer.tobytes()


def encode_jpeg_rgb(image_rgb: np.ndarray, quality: int = CAMERA_JPEG_QUALITY) -> bytes:
    """`encode_jpeg` of an HxWx3 RGB image (what `decode_jpeg_rgb` gives back)."""
    return encode_jpeg(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), quality)


def decode_jpeg_rgb(jpeg: bytes) -> np.ndarray | None:
    """An HxWx3 uint8 RGB array, or None when the bytes are not a decodable image."""
    # simplejpeg and OpenCV both decode with libjpeg-turbo's accurate DCT and smooth upsampling, so their
    # pixels are identical (tested on every shared image); simplejpeg spends ~10 % less CPU on it, and
    # decoding is most of the edge worker's CPU per frame (`fallwatch bench edge`). Both decode straight
    # to RGB. What simplejpeg refuses (a truncated or CMYK JPEG, another image format) OpenCV decodes
    # as it always did, leniently, or not at all.
    if not jpeg:
        return None  # OpenCV asserts on an empty buffer (found by tests/test_fuzz.py)
    try:
        return simplejpeg.decode_jpeg(jpeg, colorspace="RGB")
    except ValueError:
        pass
    try:
        return cv2.imdecode(np.frombuffer(jpeg, dtype=np.uint8), cv2.IMREAD_COLOR_RGB)
    except cv2.error:
        return None


def decode_known_jpeg_rgb(jpeg: bytes) -> np.ndarray:
    """`decode_jpeg_rgb` for frames this process made itself, where an undecodable one is a bug."""
    image = decode_jpeg_rgb(jpeg)
    if image is None:
        raise ValueError("a JPEG made here could not be decoded")
    return image


def keep_freed_image_memory() -> None:
    """Let glibc's malloc keep the memory of freed images for the next ones instead of returning it to the OS.

    A batch of decoded 640×480 frames is ~1 MB each, allocated on the decode threads and freed together
    once the batch is answered; with glibc's adaptive defaults that memory is given back and faulted in
    again every batch, which cost the edge worker ~0.4 ms of CPU per frame (1.2 against 0.8 ms in
    `fallwatch bench edge`). No effect where the C library has no `mallopt` (not glibc).
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, IMAGE_MMAP_THRESHOLD_BYTES)
        mallopt(M_TRIM_THRESHOLD, IMAGE_TRIM_THRESHOLD_BYTES)
