"""How counts read in messages: "1 box", "3 boxes", never "1 boxes" or "box(es)".

One helper for the whole package, so that every message says it the same way; a leaf module
(no imports), light enough for the CLI's ``--help``.
"""

from __future__ import annotations

#: Plurals that are not the singular plus "s".
_IRREGULAR = {"box": "boxes", "class": "classes", "process": "processes", "is": "are"}


def plural(count: int, singular: str, plural_form: str | None = None) -> str:
    """``count`` and the noun that agrees with it: ``plural(1, "box")`` is ``"1 box"``,
    ``plural(2, "box")`` ``"2 boxes"``; ``plural_form`` for nouns the table does not know."""
    if count == 1:
        return f"{count} {singular}"
    return f"{count} {plural_form or _IRREGULAR.get(singular, singular + 's')}"
