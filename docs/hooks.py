"""MkDocs hook: render the Sphinx-style markup of shoal's docstrings in the API pages.

The docstrings use ``:class:`Name``` roles and ``Example::`` literal-block markers, which
mkdocstrings shows verbatim; this turns the roles into plain code and the markers into
"Example:". Registered as ``hooks:`` in mkdocs.yml (and excluded from the site's files).
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj):<code>~?")
_LITERAL_MARKER = re.compile(r"(<p>[^<]*?):(:</p>)")


def on_page_content(html: str, **_: Any) -> str:
    return _LITERAL_MARKER.sub(r"\1\2", _ROLE.sub("<code>", html))
