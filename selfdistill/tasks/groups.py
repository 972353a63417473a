"""Group keys: which tasks are the same question in another form, so that the train / held-out /
audit split is decided per group and near-duplicates never straddle the wall.

A group is a canonical form of a question. For reasoning-gym datasets whose items are built from
parts whose order does not change the answer, the canonical form is those parts, sorted: on
chain_sum, "1 + 5" and "5 + 1" are one group (the multiset of signed terms). Datasets without a
canonical form here get no group (each question is its own, as before). JSONL tasks may carry a
`group` field. Pure: standard library only.
"""

from __future__ import annotations

import re
from typing import Any, Callable

_TERM = re.compile(r"([+-]?)\s*(\d+)")


def signed_terms(expression: str) -> str | None:
    """The multiset of a chain's signed terms as one sorted string ("8 - 0 + 7" and "7 - 0 + 8" are
    both "+7 +8 -0"), or None when the text is not a plain chain of + and - between integers."""
    text = expression.strip()
    if not re.fullmatch(r"\d+(\s*[+-]\s*\d+)*", text):
        return None
    terms = [(sign or "+", int(digits)) for sign, digits in _TERM.findall(text)]
    return " ".join(f"{s}{n}" for s, n in sorted(terms, key=lambda t: (t[0], t[1])))


def _chain_sum(entry: dict[str, Any]) -> str | None:
    expr = (entry.get("metadata") or {}).get("expression")
    return signed_terms(expr) if isinstance(expr, str) else None


GROUPERS: dict[str, Callable[[dict[str, Any]], str | None]] = {"chain_sum": _chain_sum}


def reasoning_gym_group(dataset: str, entry: dict[str, Any]) -> str | None:
    """The group of one reasoning-gym item ("dataset:canonical form"), or None without one."""
    grouper = GROUPERS.get(dataset)
    form = grouper(entry) if grouper else None
    return f"{dataset}:{form}" if form else None
