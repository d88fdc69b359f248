"""Text that is safe to put on an operator's terminal.

Log lines carry data a client chose (a URL path, an ``x-request-id``, a user agent, a model
name) and whatever user code printed. Written raw, an escape sequence in them reaches the
terminal of whoever reads the file with ``shoal logs``, ``tail`` or ``less -R``: it can retitle
the window, clear the screen, hide lines, or (on some terminals) answer back into the shell.
:func:`escape` writes every such character as visible text instead: ``\\x1b`` (four
characters) for ESC, ``\\u202e`` for a right-to-left override. Ordinary text, non-ASCII
letters included, is unchanged.

Escaped: the C0 controls (tab and newline aside), DEL, the C1 controls U+0080 to U+009F (a
terminal may take U+009B as CSI), the line and paragraph separators U+2028 and U+2029, and the
bidirectional formatting characters (U+061C, U+200E, U+200F, U+202A to U+202E, U+2066 to
U+2069), which reorder what is shown. This module is imported by the proxy, so it stays light.
"""

from __future__ import annotations

import re

__all__ = ["escape", "escape_line"]

# Tab and newline are kept by escape(); escape_line() folds newlines itself.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_UNSAFE_LINE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r"}


def _visible(m: re.Match[str]) -> str:
    c = m.group()
    named = _NAMED.get(c)
    if named is not None:
        return named
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


def escape(text: str) -> str:
    """``text`` with every character that could steer a terminal written as an escape;
    newlines and tabs are kept (multi-line records stay readable)."""
    if text.isprintable():  # the common case, checked in C: nothing to do
        return text
    return _UNSAFE.sub(_visible, text)


def escape_line(text: str) -> str:
    """Like :func:`escape`, and newlines written as ``\\n``, carriage returns as ``\\r``: one
    line whatever ``text`` holds (a log file's one line per event)."""
    if text.isprintable():
        return text
    return _UNSAFE_LINE.sub(_visible, text)
