"""Which callers may call which routes.

A policy is a set of rules ``route -> allowed callers``. Routes match on whole
path segments (``/pay`` covers ``/pay`` and ``/pay/x``, never ``/payroll``);
of the rules covering a path, the most specific one (the longest route)
decides, whatever order the rules were given in and whichever constructor
built the policy. Two rules for the same route (``/pay`` and ``/pay/`` are the
same route) are a configuration error: which of them should decide is exactly
what the author did not say. A path no rule covers is denied (fail closed)
unless ``default_allow`` is set.

Caller patterns:

- ``spiffe://example.org/ns/web`` — exactly that identity;
- ``spiffe://example.org`` — any identity in that trust domain;
- ``spiffe://example.org/ns/*`` — any identity under that path (segment boundary);
- ``*`` — any authenticated caller.

``wimse://`` identifiers follow the same forms.

Patterns and routes are validated when the policy is built: a typo such as
``spiffe://Example.org``, a trailing slash, a ``*`` in the middle of a path or
a route without its leading ``/`` would otherwise never match anything, and the
operator would learn of it only from refused callers. A bare string where a
list of callers belongs is refused too: iterating it would turn each
character into a pattern, and a ``*`` among them would admit everyone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from custos.errors import CustosError
from custos.identity import (
    InvalidIdentifierError,
    SpiffeId,
    TrustDomain,
    WimseId,
    parse_workload_id,
)
from custos.wimse.errors import PolicyError


class PolicyConfigError(CustosError, ValueError):
    """A policy rule that cannot mean what its author intended."""

    code = "policy_invalid"


def _check_identifier_or_domain(text: str) -> None:
    """``text`` is a workload identifier or a bare ``scheme://trust-domain``."""
    scheme, sep, rest = text.partition("://")
    if sep and scheme in ("spiffe", "wimse") and "/" not in rest:
        TrustDomain(rest)  # a trust domain (a Workload Identifier Origin for wimse://)
        return
    parse_workload_id(text)


def _validated_pattern(raw: object) -> str:
    if not isinstance(raw, str):
        raise PolicyConfigError(f"a caller pattern must be a string, not {type(raw).__name__}")
    if raw == "*":
        return raw
    base = raw[:-2] if raw.endswith("/*") else raw
    if "*" in base:
        raise PolicyConfigError(
            f"caller pattern {raw!r}: '*' is allowed only alone or as a final '/*'"
        )
    try:
        _check_identifier_or_domain(base)
    except InvalidIdentifierError as e:
        raise PolicyConfigError(f"caller pattern {raw!r} is not usable: {e}") from e
    return raw


def _validated_route(route: object) -> str:
    if not isinstance(route, str) or not route.startswith("/"):
        raise PolicyConfigError(f"route {route!r} must be a path starting with '/'")
    if "?" in route or "#" in route or any(seg in (".", "..") for seg in route.split("/")):
        raise PolicyConfigError(f"route {route!r} must be a plain path (no query, no dot segments)")
    if "*" in route:
        # Routes are segment prefixes already ("/admin" covers "/admin/x"); a
        # literal "*" would never match, and with default_allow that fails open.
        raise PolicyConfigError(
            f"route {route!r}: no wildcards in routes; '/admin' already covers '/admin/...'"
        )
    return route


def _segments_prefix(prefix: str, path: str) -> bool:
    prefix = prefix.rstrip("/")
    if prefix == "":
        return True
    return path == prefix or path.startswith(prefix + "/")


@dataclass(frozen=True)
class CallerPattern:
    raw: str

    def __post_init__(self) -> None:
        _validated_pattern(self.raw)

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


@dataclass(frozen=True, init=False)
class Rule:
    """One route and who may call it.

    ``callers`` may hold strings, ``SpiffeId`` / ``WimseId`` values or
    ``CallerPattern`` objects; they are converted and validated here, by the
    same function :meth:`CallerPolicy.from_mapping` uses, so a rule built
    directly behaves exactly like one from a mapping (a ``SpiffeId`` kept as
    it was would fail only at the first request, as a 500).
    """

    route: str
    callers: tuple[CallerPattern, ...]

    def __init__(self, route: str, callers: Iterable[CallerLike]) -> None:
        # A frozen dataclass sets its fields this way in its own generated __init__.
        object.__setattr__(self, "route", _validated_route(route))
        object.__setattr__(self, "callers", _callers_of(route, callers))

    def covers(self, path: str) -> bool:
        return _segments_prefix(self.route, path)

    def allows(self, subject: str) -> bool:
        return any(p.matches(subject) for p in self.callers)


def _route_key(route: str) -> str:
    """The form two routes are compared in: ``/pay/`` covers what ``/pay`` does."""
    return route.rstrip("/")


def _callers_of(route: object, callers: object) -> tuple[CallerPattern, ...]:
    if isinstance(callers, (str, bytes)) or not isinstance(callers, Iterable):
        raise PolicyConfigError(
            f"route {route!r}: callers must be a list of patterns, not a single string"
        )
    return tuple(_pattern(p) for p in callers)


#: What a rule's caller list may hold.
CallerLike = str | SpiffeId | WimseId | CallerPattern


def _pattern(value: object) -> CallerPattern:
    """A caller pattern from what a user has: a string, a ``SpiffeId`` /
    ``WimseId`` (exactly that identity), or a ready ``CallerPattern``."""
    if isinstance(value, CallerPattern):
        return value
    if isinstance(value, SpiffeId | WimseId):
        if not value.path:
            # A bare trust-domain ID would become a whole-domain pattern, while
            # an ID object means exactly one identity.
            raise PolicyConfigError(
                f"{value} names a trust domain, not a workload; write the string "
                f"'{value}' (or '{value}/*') to admit the whole trust domain"
            )
        return CallerPattern(str(value))
    return CallerPattern(value)  # type: ignore[arg-type]  # validated: not a str -> error


class CallerPolicy:
    """Route -> allowed callers; the most specific covering route decides.

    ``CallerPolicy(rules)``, :meth:`from_mapping` and :meth:`from_rules` build
    the same thing from the same rules: rules are kept most specific first, so
    a ``/`` rule listed before ``/admin`` never decides for ``/admin``.
    """

    def __init__(self, rules: Iterable[Rule], *, default_allow: bool = False) -> None:
        given = tuple(rules)
        seen: dict[str, str] = {}
        for rule in given:
            if not isinstance(rule, Rule):
                raise PolicyConfigError(
                    f"a policy rule must be a Rule, not {type(rule).__name__} "
                    "(CallerPolicy.from_rules takes (route, callers) pairs)"
                )
            key = _route_key(rule.route)
            if key in seen:
                raise PolicyConfigError(
                    f"route {rule.route!r} is given more than once (as {seen[key]!r} too); "
                    "merge the callers into one rule"
                )
            seen[key] = rule.route
        # Longest route first: the first covering rule in this order is the
        # most specific one. sorted() is stable but no two keys are equal here.
        self.rules: tuple[Rule, ...] = tuple(
            sorted(given, key=lambda r: len(_route_key(r.route)), reverse=True)
        )
        self.default_allow = default_allow

    @classmethod
    def from_rules(
        cls, rules: Iterable[tuple[str, Iterable[CallerLike]]], *, default_allow: bool = False
    ) -> CallerPolicy:
        """``[("/pay", ["spiffe://example.org/ns/shop/*"]), ("/", ["spiffe://example.org"])]``."""
        return cls(
            [Rule(route, callers) for route, callers in rules],
            default_allow=default_allow,
        )

    @classmethod
    def from_mapping(
        cls, mapping: Mapping[str, Sequence[CallerLike]], *, default_allow: bool = False
    ) -> CallerPolicy:
        """``{"/pay": ["spiffe://example.org/ns/shop/*"], "/": ["spiffe://example.org"]}``."""
        return cls.from_rules(mapping.items(), default_allow=default_allow)

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


PolicyLike = CallerPolicy | Mapping[str, Sequence[CallerLike]] | None


def as_policy(policy: PolicyLike) -> CallerPolicy:
    """What the middlewares accept as ``policy``: a :class:`CallerPolicy`, a
    mapping for :meth:`CallerPolicy.from_mapping` (so the common case needs
    no extra object), or None for :meth:`CallerPolicy.allow_all` (any
    authenticated caller)."""
    if policy is None:
        return CallerPolicy.allow_all()
    if isinstance(policy, CallerPolicy):
        return policy
    if isinstance(policy, Mapping):
        return CallerPolicy.from_mapping(policy)
    raise PolicyConfigError(
        f"policy must be a CallerPolicy or a mapping of routes, not {type(policy).__name__}"
    )
