"""Which fields an error string blames, read the way a client reads it.

A bad-input error is clauses joined by "; ", each "<field>: <what is allowed>" (or "<a>, <b>: unknown fields",
"<a> and <b>: both given…"). Checking only that a field's name occurs somewhere would pass when it occurs
merely in the "allowed fields are …" list; this reads the subjects of the clauses instead.
"""

from __future__ import annotations

import re

FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def offending_fields(error: str) -> set[str]:
    """The fields a clause is about (``ref_audio[1]`` and ``voice.name`` count as their field)."""
    blamed: set[str] = set()
    for clause in error.split("; "):
        subject, colon, _ = clause.partition(": ")
        if not colon:
            continue
        for name in re.split(r", | and ", subject):
            match = FIELD.match(name)
            if match and match.end() in (len(name), name.find("["), name.find(".")):
                blamed.add(match.group())
    return blamed
