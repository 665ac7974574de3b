"""xhtml2pdf in a sandbox: the renderer reads the bundled assets and nothing else.

Invoices print names that came from requests, so the HTML they render is treated as hostile
even after autoescaping. Two locks on the door, because either alone has gaps:

- a ``link_callback`` allow-list: the template names assets as ``asset:...``; those resolve to
  files in ``admin/assets`` and every other URL or path becomes ``data:,`` (an empty inline
  resource). Returning ``None`` or ``""`` instead would make xhtml2pdf fetch the original URI.
- a ``ResourceAccessPolicy``: local reads confined to ``admin/assets``, no remote fetches at
  all, and limits on size, depth and time (some fetch paths, e.g. fonts and page backgrounds,
  do not pass through the callback).

Renders are deterministic (ReportLab's invariant mode), so the same document gives the same
bytes.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Iterator
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
#: The only files the PDF renderer may read, by the name the template uses for them.
BUNDLED_ASSETS: dict[str, Path] = {
    "asset:logo.png": ASSETS / "logo.png",
    "asset:fonts/DejaVuSans.ttf": ASSETS / "fonts" / "DejaVuSans.ttf",
    "asset:fonts/DejaVuSans-Bold.ttf": ASSETS / "fonts" / "DejaVuSans-Bold.ttf",
}
BLOCKED = "data:,"  # what the link_callback answers for anything else (None would fetch it)
MAX_RENDER_SECONDS = 300

_INVARIANT_LOCK = threading.Lock()


class InvoiceRenderError(Exception):
    """The PDF could not be rendered (a render limit was hit or xhtml2pdf failed)."""


def link_callback(uri: str, rel: str | None = None) -> str:
    """Resolve only the bundled assets; every other URL or path becomes an empty data URI."""
    path = BUNDLED_ASSETS.get(uri)
    return str(path) if path is not None else BLOCKED


@contextlib.contextmanager
def _reportlab_invariant() -> Iterator[None]:
    """ReportLab's invariant mode: no creation time or random file id, so same input → same PDF.

    It is a process-wide switch in ``rl_config``; the lock keeps our renders from interleaving
    with each other while it is set.
    """
    from reportlab import rl_config

    with _INVARIANT_LOCK:
        before = rl_config.invariant
        rl_config.invariant = 1
        try:
            yield
        finally:
            rl_config.invariant = before


def html_to_pdf(html: str, what: str = "document") -> bytes:
    """Render XHTML to PDF bytes under the sandbox; CPU-bound (call it in a thread).

    Raises ``InvoiceRenderError`` (never anything else) when the document cannot be rendered.
    """
    from xhtml2pdf import pisa
    from xhtml2pdf.config.resources import RenderLimitError, ResourceAccessPolicy

    policy = ResourceAccessPolicy.server(base_dir=ASSETS, allow_remote=False,
                                         max_render_seconds=MAX_RENDER_SECONDS)
    out = io.BytesIO()
    with _reportlab_invariant():
        try:
            result = pisa.pisaDocument(html, dest=out, link_callback=link_callback,
                                       resource_policy=policy, encoding="utf-8",
                                       path=str(ASSETS / "document.html"))
        except RenderLimitError as exc:
            raise InvoiceRenderError(f"{what} is too large to render: {exc}") from exc
        except Exception as exc:  # xhtml2pdf raises many kinds; none may become a 500
            raise InvoiceRenderError(f"{what} could not be rendered: "
                                     f"{type(exc).__name__}: {exc}") from exc
    if getattr(result, "err", 0):
        raise InvoiceRenderError(f"{what} could not be rendered ({result.err} errors)")
    return out.getvalue()
