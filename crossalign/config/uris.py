"""Credentials in URIs: found whatever the password holds, and hidden whole in any message."""
from __future__ import annotations

import re
import urllib.parse
from typing import Any

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _userinfo_span(text: str) -> tuple[int, int] | None:
    """Where the userinfo of the URL ``text`` lies, as ``(start, end)`` indices: from after
    ``scheme://`` to the LAST ``@`` (``None``: no ``scheme://`` or no ``@`` after it, or an empty
    authority as in ``sqlite:////abs/path``). A password written unescaped may hold ``@``, ``/``,
    ``:``, ``?`` or ``#``, so no earlier ``@`` or ``/`` can be taken for the end of it: an ``@`` in
    a path or query counts as well, which errs on the side of hiding."""
    found = _SCHEME.match(text)
    if not found:
        return None
    try:  # urllib.parse agrees on the scheme where it can parse the text at all
        if urllib.parse.urlsplit(text).scheme.lower() != found.group()[:-3].lower():
            return None
    except ValueError:  # e.g. an unbalanced '[' in a password: urllib gives up, the '@' rule still holds
        pass
    start, end = found.end(), text.rfind("@")
    if end < start or text.startswith("/", start):
        return None
    return start, end


def uri_userinfo(uri: str) -> str | None:
    """The userinfo (``user`` or ``user:password``) of ``uri``, taken as :func:`_userinfo_span`
    does; ``None`` when it has none."""
    span = _userinfo_span(uri)
    return uri[span[0]:span[1]] if span else None


def uri_has_password(uri: str) -> bool:
    """Whether ``uri`` carries a password: a ``:`` in its userinfo (``user:password@``) or a
    ``password`` query parameter (libpq's ``?password=``)."""
    info = uri_userinfo(uri)
    if info is not None and ":" in info:
        return True
    query = uri.split("?", 1)[1] if "?" in uri else ""
    return any(k.strip().lower() == "password" for k, _ in urllib.parse.parse_qsl(query, keep_blank_values=True))


def redact_uri(text: str) -> str:
    """``text`` with the whole userinfo of a URL replaced by ``<credentials>`` and any ``password``
    query value by ``<password>``; other text unchanged."""
    text = re.sub(r"(?i)([?&;]\s*password\s*=)[^&;]*", r"\1<password>", text)  # first: it may hold an '@'
    span = _userinfo_span(text)
    return text[:span[0]] + "<credentials>" + text[span[1]:] if span else text


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact_uri(value)
    if isinstance(value, dict):
        return {_redacted(k): _redacted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return type(value)(_redacted(v) for v in value)
    return value


def _shown(value: Any) -> str:
    """``repr`` of a bad value for an error message, the userinfo of every URL in it (strings,
    nested in mappings and lists) blanked: :func:`redact_uri`."""
    return repr(_redacted(value))
