"""The dashboard the admin port serves at ``/``: one self-contained HTML page (``dashboard.html``, package data, its
CSS and JS inline) that polls ``GET /dashboard/data`` and posts to ``POST /explain``.

The page is served with a Content-Security-Policy that allows its own inline script and style by their SHA-256 and
nothing else: no other script runs (not even one injected through a model name the page failed to escape), no asset
loads from anywhere, and the page talks to this server only.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.resources
import re

PAGE = "dashboard.html"


@functools.cache
def page() -> str:
    return importlib.resources.files(__package__).joinpath(PAGE).read_text("utf-8")


@functools.cache
def headers() -> dict[str, str]:
    """The page's response headers: its CSP, and no sniffing, framing or referrer."""
    html = page()
    policy = "; ".join(
        [
            "default-src 'none'",
            f"script-src {_hashes(html, 'script')}",
            f"style-src {_hashes(html, 'style')}",
            "connect-src 'self'",
            "img-src data:",  # the empty favicon (without one the browser asks for /favicon.ico: a 404)
            "base-uri 'none'",
            "form-action 'none'",  # the lookup form is handled by the script and never submitted
            "frame-ancestors 'none'",
        ]
    )
    return {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }


def _hashes(html: str, tag: str) -> str:
    """The CSP source list of every inline ``<tag>`` element of ``html``, by the SHA-256 of its exact text."""
    bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    if not bodies:
        raise ValueError(f"{PAGE} has no inline <{tag}>")
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in bodies)
