"""Camera URLs: which kind of source, whether it is usable, and how to show it without credentials.

Kept free of OpenCV so the settings can validate URLs cheaply in every service.
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

SourceKind = Literal["file", "stream", "device"]
STREAM_SCHEMES = ("rtsp", "rtsps", "http", "https")


def source_kind(url: str) -> SourceKind:
    if url.startswith("/dev/"):  # /dev/videoN, and the stable names under /dev/v4l/by-id and by-path
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


# A URL inside any text: scheme, then everything up to whitespace (a password may hold '@', ':' or '/').
URL_PATTERN = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)(\S+)")
# Query parameters that carry credentials in cameras' HTTP APIs (…/video.cgi?user=admin&pwd=secret).
SECRET_PARAMETER = re.compile(
    r"([?&;](?:user|username|usr|login|password|passwd|pass|pwd|psw|token|access_token|auth|key|api_key|apikey|"
    r"secret|signature|sig)=)[^&;#\s]*",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """Hide credentials of every URL in `text` (rtsp://user:pass@host/..., ...?pwd=...) before logs or status.

    Everything up to the *last* '@' of a URL is the user part: a password may itself contain '@' or
    '/', and showing too little of an odd URL is better than showing a password.
    """

    def hide(match: re.Match[str]) -> str:
        scheme, rest = match.groups()
        if "@" in rest:
            rest = "***@" + rest.rsplit("@", 1)[1]
        return scheme + SECRET_PARAMETER.sub(r"\1***", rest)

    return URL_PATTERN.sub(hide, text)
