"""The email channel: one message (plain text + HTML) over SMTP with the standard library, in
one of the sender's own threads, so neither the event loop nor the threads the request path
uses (``asyncio.to_thread``) ever wait on a mail server."""

from __future__ import annotations

import asyncio
import html
import smtplib
from concurrent.futures import Executor
from email.message import EmailMessage
from typing import Any

from gateway.config.alerts import Channel, Smtp


def render(event: dict[str, Any]) -> tuple[str, str, str]:
    """Subject, plain text and HTML of an event."""
    data = event.get("data") or {}
    subject = f"[costwall] {event.get('type', 'alert')}"
    if "scope" in data:
        subject += f" {data['scope']}:{data.get('id', '')}"
    lines = [f"{k}: {v}" for k, v in data.items() if v is not None and not isinstance(v, list)]
    text = "\n".join([str(event.get("type")), "", *lines, "", f"event {event.get('id')}"])
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in data.items() if v is not None and not isinstance(v, list))
    body = (f"<h2>{html.escape(str(event.get('type')))}</h2><table>{rows}</table>"
            f"<p>event {html.escape(str(event.get('id')))}</p>")
    return subject, text, body


def message(smtp: Smtp, to: tuple[str, ...], event: dict[str, Any],
            attachments: tuple[tuple[str, bytes, str], ...] = ()) -> EmailMessage:
    subject, text, body = render(event)
    msg = EmailMessage()
    msg["Subject"], msg["From"], msg["To"] = subject, smtp.sender, ", ".join(to)
    msg["Message-ID"] = f"<{event.get('id')}@costwall>"
    msg.set_content(text)
    msg.add_alternative(body, subtype="html")
    for name, data, mime in attachments:
        main, sub = mime.split("/", 1)
        msg.add_attachment(data, maintype=main, subtype=sub, filename=name)
    return msg


def _send(smtp: Smtp, msg: EmailMessage, timeout: float) -> None:
    with smtplib.SMTP(smtp.host, smtp.port, timeout=timeout) as client:
        if smtp.starttls:
            client.starttls()
        if smtp.username and smtp.password:
            client.login(smtp.username, smtp.password)
        client.send_message(msg)


async def send_email(smtp: Smtp, channel: Channel, event: dict[str, Any], timeout: float,
                     files: list[tuple[str, bytes, str]] | None = None,
                     executor: Executor | None = None) -> None:
    """Send ``event`` (with ``files`` attached) to the channel's addresses in ``executor``'s
    threads; network errors propagate (and are retried)."""
    msg = message(smtp, channel.to, event, tuple(files or ()))
    await asyncio.get_running_loop().run_in_executor(executor, _send, smtp, msg, timeout)
