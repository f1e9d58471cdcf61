"""Which callers may call which routes.

A policy is an ordered list of rules ``route -> allowed callers``. Routes match
on whole path segments (``/pay`` covers ``/pay`` and ``/pay/x``, never
``/payroll``); the first rule whose route matches decides. A path no rule
covers is denied (fail closed) unless ``default_allow`` is set.

Caller patterns:

- ``spiffe://example.org/ns/web`` — exactly that identity;
- ``spiffe://example.org`` — any identity in that trust domain;
- ``spiffe://example.org/ns/*`` — any identity under that path (segment boundary);
- ``*`` — any authenticated caller.

``wimse://`` identifiers follow the same forms.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from custos.wimse.errors import PolicyError


def _segments_prefix(prefix: str, path: str) -> bool:
    prefix = prefix.rstrip("/")
    if prefix == "":
        return True
    return path == prefix or path.startswith(prefix + "/")


@dataclass(frozen=True)
class CallerPattern:
    raw: str

    def matches(self, subject: str) -> bool:
        if self.raw == "*":
            return True
        if self.raw.endswith("/*"):
            return _segments_prefix(self.raw[:-2], subject) and subject != self.raw[:-2]
        scheme_end = self.raw.find("://")
        if scheme_end != -1 and "/" not in self.raw[scheme_end + 3 :]:
            # a bare trust domain: any identity in it
            return subject.startswith(self.raw + "/") or subject == self.raw
        return subject == self.raw


@dataclass(frozen=True)
class Rule:
    route: str
    callers: tuple[CallerPattern, ...]

    def covers(self, path: str) -> bool:
        return _segments_prefix(self.route, path)

    def allows(self, subject: str) -> bool:
        return any(p.matches(subject) for p in self.callers)


class CallerPolicy:
    def __init__(self, rules: Iterable[Rule], *, default_allow: bool = False) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.default_allow = default_allow

    @classmethod
    def from_mapping(
        cls, mapping: Mapping[str, Sequence[str]], *, default_allow: bool = False
    ) -> CallerPolicy:
        """``{"/pay": ["spiffe://example.org/ns/shop/*"], "/": ["spiffe://example.org"]}``.

        Longer routes are tried first, so the most specific rule decides.
        """
        rules = [
            Rule(route, tuple(CallerPattern(p) for p in callers))
            for route, callers in mapping.items()
        ]
        rules.sort(key=lambda r: len(r.route.rstrip("/")), reverse=True)
        return cls(rules, default_allow=default_allow)

    @classmethod
    def allow_all(cls) -> CallerPolicy:
        return cls([], default_allow=True)

    def check(self, subject: str, path: str) -> None:
        for rule in self.rules:
            if rule.covers(path):
                if rule.allows(subject):
                    return
                raise PolicyError("caller not allowed on this route")
        if not self.default_allow:
            raise PolicyError("no policy rule covers this route")
