"""Camera URLs: which kind of source, whether it is usable, and how to show it without credentials.

Kept free of OpenCV so the settings can validate URLs cheaply in every service.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

SourceKind = Literal["file", "stream", "device"]
STREAM_SCHEMES = ("rtsp", "rtsps", "http", "https")


def source_kind(url: str) -> SourceKind:
    if url.startswith("/dev/video"):
        return "device"
    return "stream" if "://" in url and not url.startswith("file://") else "file"


def url_problem(url: str) -> str | None:
    """Why `url` cannot be a camera source, or None; the message never shows credentials."""
    if "://" not in url:
        return None  # a file path or /dev/videoN; whether it exists is checked when the producer starts
    parts = urlsplit(url)
    if parts.scheme == "file":
        return None if parts.path else f"{redact(url)} names no file"
    if parts.scheme not in STREAM_SCHEMES:
        schemes = ", ".join(f"{s}://" for s in STREAM_SCHEMES)
        return f"unsupported scheme {parts.scheme!r} in {redact(url)} (use {schemes}, a file path or /dev/videoN)"
    try:
        port = parts.port
    except ValueError:
        return f"invalid port in {redact(url)}"
    if not parts.hostname:
        return f"no host in {redact(url)}"
    if port == 0:
        return f"invalid port in {redact(url)}"
    return None


def redact(url: str) -> str:
    """Hide credentials in camera URLs (rtsp://user:pass@host/...) before they reach logs or status."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
