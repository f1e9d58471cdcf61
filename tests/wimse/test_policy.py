"""Route policy: which identities may call which paths; fails closed."""

from __future__ import annotations

import json

import pytest

from custos.integrations.problem import Problem
from custos.wimse.errors import PolicyError, WptError
from custos.wimse.policy import CallerPolicy

POLICY = CallerPolicy.from_mapping(
    {
        "/pay": ["spiffe://example.org/ns/shop/*"],
        "/admin": ["spiffe://example.org/ns/ops/sa/admin"],
        "/public": ["*"],
        "/": ["spiffe://example.org"],
    }
)


@pytest.mark.parametrize(
    ("subject", "path"),
    [
        ("spiffe://example.org/ns/shop/sa/web", "/pay"),
        ("spiffe://example.org/ns/shop/sa/web", "/pay/123"),
        ("spiffe://example.org/ns/ops/sa/admin", "/admin/users"),
        ("spiffe://other.org/anyone", "/public"),
        ("spiffe://example.org/ns/anything", "/orders"),
    ],
)
def test_allowed(subject: str, path: str) -> None:
    POLICY.check(subject, path)


@pytest.mark.parametrize(
    ("subject", "path"),
    [
        # /payroll is not under /pay: the most specific rule covering it is "/"
        ("spiffe://other.org/ns/shop/sa/web", "/payroll"),
        # path-prefix pattern is segment-bounded: /ns/shopping is not /ns/shop/*
        ("spiffe://example.org/ns/shopping/sa/web", "/pay"),
        # the prefix itself is not "under" the prefix
        ("spiffe://example.org/ns/shop", "/pay"),
        # exact pattern: a longer id is not the same id
        ("spiffe://example.org/ns/ops/sa/admin2", "/admin"),
        # trust domain pattern: a look-alike trust domain is another trust domain
        ("spiffe://example.org.evil.com/x", "/orders"),
        ("spiffe://other.org/x", "/orders"),
    ],
)
def test_denied(subject: str, path: str) -> None:
    with pytest.raises(PolicyError):
        POLICY.check(subject, path)


def test_uncovered_route_fails_closed() -> None:
    policy = CallerPolicy.from_mapping({"/pay": ["*"]})
    with pytest.raises(PolicyError):
        policy.check("spiffe://example.org/x", "/payroll")
    CallerPolicy.allow_all().check("spiffe://example.org/x", "/payroll")


def test_problem_json_reveals_only_the_code() -> None:
    err = WptError("wth does not match the hash of eyJhbGciOi... secret detail")
    problem = Problem.from_error(err)
    body = json.loads(problem.body())
    assert body == {
        "type": "urn:custos:problem:invalid_wpt",
        "title": "Unauthorized",
        "status": 401,
        "code": "invalid_wpt",
    }
    assert ("www-authenticate", "WPT") in problem.headers()
    assert ("content-type", "application/problem+json") in problem.headers()
    forbidden = Problem.from_error(PolicyError("x"))
    assert forbidden.status == 403 and all(h[0] != "www-authenticate" for h in forbidden.headers())


# -- policy configuration is validated when built ---------------------------------

from custos.wimse.policy import PolicyConfigError  # noqa: E402


def test_single_string_instead_of_list_is_refused() -> None:
    # Attack: iterating "spiffe://example.org/ns/shop/*" yields a "*" pattern,
    # which would admit every authenticated caller on /pay.
    with pytest.raises(PolicyConfigError, match="list of patterns"):
        CallerPolicy.from_mapping({"/pay": "spiffe://example.org/ns/shop/*"})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    "pattern",
    [
        "spiffe://Example.org",  # trust domains are lowercase
        "spiffe://example.org/",  # trailing slash
        "example.org",  # no scheme
        "spiffe://example.org/ns/*/x",  # a wildcard in the middle
        "spiffe://example.org/ns*",  # a glob that is not a segment wildcard
        "**",
        "",
        "https://example.org/x",
        "spiffe://example.org/a//b",
    ],
)
def test_unusable_caller_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(PolicyConfigError):
        CallerPolicy.from_mapping({"/pay": [pattern]})


def test_wildcard_route_is_refused_not_failed_open() -> None:
    # Attack: "/admin/*" taken literally never matches, so with default_allow
    # every caller would reach /admin/users.
    with pytest.raises(PolicyConfigError, match="no wildcards"):
        CallerPolicy.from_mapping({"/admin/*": ["spiffe://example.org/admin"]}, default_allow=True)


@pytest.mark.parametrize("route", ["pay", "", "/a/../b", "/pay?x=1", "/pay#f", "/*", "/a*"])
def test_unusable_routes_are_refused(route: str) -> None:
    with pytest.raises(PolicyConfigError):
        CallerPolicy.from_mapping({route: ["*"]})


@pytest.mark.parametrize(
    "pattern",
    [
        "*",
        "spiffe://example.org",
        "spiffe://example.org/*",
        "spiffe://example.org/ns/shop/*",
        "wimse://example.org",
        "wimse://example.org/*",
        "wimse://example.org/svc~a",
    ],
)
def test_usable_caller_patterns_are_accepted(pattern: str) -> None:
    CallerPolicy.from_mapping({"/pay": [pattern]})


def test_trust_domain_wildcard_admits_members_only() -> None:
    policy = CallerPolicy.from_mapping({"/": ["spiffe://example.org/*"]})
    policy.check("spiffe://example.org/a", "/x")
    with pytest.raises(PolicyError):
        policy.check("spiffe://example.org.evil/a", "/x")


# -- one semantics for every way of building a policy (issue 7, item 1) ----------------

from custos.wimse.policy import Rule  # noqa: E402

ADMIN = "spiffe://example.org/ns/ops/sa/admin"
ANYONE_IN_TD = "spiffe://example.org/ns/shop/sa/web"


def _rule(route: str, *patterns: str) -> Rule:
    from custos.wimse.policy import CallerPattern

    return Rule(route, tuple(CallerPattern(p) for p in patterns))


def test_broad_rule_given_first_does_not_open_a_specific_route() -> None:
    # Attack: a "/" rule listed before "/admin" let every caller of "/" into /admin.
    policy = CallerPolicy([_rule("/", "spiffe://example.org"), _rule("/admin", ADMIN)])
    policy.check(ADMIN, "/admin/users")
    with pytest.raises(PolicyError):
        policy.check(ANYONE_IN_TD, "/admin/users")
    policy.check(ANYONE_IN_TD, "/orders")


def test_specific_rule_decides_even_when_narrower_in_callers() -> None:
    # The most specific route decides, also when it is more permissive.
    policy = CallerPolicy([_rule("/", ADMIN), _rule("/public", "*")])
    policy.check("spiffe://other.org/x", "/public/doc")
    with pytest.raises(PolicyError):
        policy.check("spiffe://other.org/x", "/private")


@pytest.mark.parametrize(
    "rules",
    [
        [("/", ["spiffe://example.org"]), ("/admin", [ADMIN])],
        [("/admin", [ADMIN]), ("/", ["spiffe://example.org"])],
    ],
)
def test_every_constructor_and_order_gives_the_same_answers(
    rules: list[tuple[str, list[str]]],
) -> None:
    built = [
        CallerPolicy([_rule(r, *c) for r, c in rules]),
        CallerPolicy.from_mapping(dict(rules)),
        CallerPolicy.from_rules(rules),
    ]
    for policy in built:
        policy.check(ADMIN, "/admin")
        policy.check(ANYONE_IN_TD, "/")
        with pytest.raises(PolicyError):
            policy.check(ANYONE_IN_TD, "/admin/x")


@pytest.mark.parametrize(
    "routes",
    [
        ("/admin", "/admin"),
        ("/admin", "/admin/"),  # the same route: "/admin" covers exactly what "/admin/" does
        ("/", "/"),
    ],
)
def test_equal_routes_given_twice_are_a_config_error(routes: tuple[str, str]) -> None:
    with pytest.raises(PolicyConfigError, match="more than once"):
        CallerPolicy([_rule(routes[0], ADMIN), _rule(routes[1], "*")])
    with pytest.raises(PolicyConfigError, match="more than once"):
        CallerPolicy.from_rules([(routes[0], [ADMIN]), (routes[1], ["*"])])


def test_from_mapping_refuses_routes_that_are_equal_after_normalising() -> None:
    with pytest.raises(PolicyConfigError, match="more than once"):
        CallerPolicy.from_mapping({"/pay": ["*"], "/pay/": [ADMIN]})


def test_rules_are_kept_most_specific_first() -> None:
    policy = CallerPolicy([_rule("/", "*"), _rule("/a/b", "*"), _rule("/a", "*")])
    assert [r.route for r in policy.rules] == ["/a/b", "/a", "/"]


def test_rules_must_be_rule_objects() -> None:
    with pytest.raises(PolicyConfigError):
        CallerPolicy([("/", ["*"])])  # type: ignore[list-item]


def test_identifier_objects_are_accepted_as_exact_patterns() -> None:
    from custos.identity import SpiffeId, TrustDomain

    admin = SpiffeId.parse(ADMIN)
    policy = CallerPolicy.from_mapping({"/admin": [admin], "/": ["spiffe://example.org"]})
    policy.check(ADMIN, "/admin")
    with pytest.raises(PolicyError):
        policy.check(ANYONE_IN_TD, "/admin")
    # a bare TrustDomain has no scheme: say which one with a string
    with pytest.raises(PolicyConfigError):
        CallerPolicy.from_mapping({"/": [TrustDomain.parse("example.org")]})  # type: ignore[list-item]


# -- Rule(...) itself takes what from_mapping takes (audit of issue 7) --------------------

from custos.identity import SpiffeId, WimseId  # noqa: E402


@pytest.mark.parametrize(
    "caller",
    [
        SpiffeId.parse("spiffe://example.org/a"),
        WimseId.parse("wimse://example.org/a"),
        "spiffe://example.org/a",
    ],
    ids=["SpiffeId", "WimseId", "str"],
)
def test_rule_built_directly_converts_its_callers(caller: object) -> None:
    # Before: Rule kept a SpiffeId as it was and check() raised AttributeError
    # (a 500 in the middleware) on the first request.
    subject = str(caller)
    policy = CallerPolicy([Rule("/", (caller,))])  # type: ignore[arg-type]
    policy.check(subject, "/x")
    assert all(type(p).__name__ == "CallerPattern" for p in policy.rules[0].callers)
    with pytest.raises(PolicyError):
        policy.check(subject + "b", "/x")


@pytest.mark.parametrize(
    "callers",
    ["spiffe://example.org/a", ("spiffe://Example.org/a",), (42,), ("spiffe://example.org/*/x",)],
)
def test_rule_built_directly_refuses_bad_callers(callers: object) -> None:
    with pytest.raises(PolicyConfigError):
        Rule("/", callers)  # type: ignore[arg-type]


def test_rule_accepts_any_iterable_of_callers_and_keeps_a_tuple() -> None:
    rule = Rule("/", ["spiffe://example.org/a", "*"])
    assert isinstance(rule.callers, tuple)
    assert rule == Rule("/", ("spiffe://example.org/a", "*"))


def test_a_trust_domain_id_object_is_not_a_whole_domain_pattern() -> None:
    # Review of issue 7: SpiffeId("spiffe://example.org") became a whole-domain pattern,
    # while an ID object means exactly one identity.
    with pytest.raises(PolicyConfigError, match="trust domain"):
        CallerPolicy.from_mapping({"/admin": [SpiffeId.parse("spiffe://example.org")]})
    with pytest.raises(PolicyConfigError, match="trust domain"):
        CallerPolicy([Rule("/admin", (SpiffeId.parse("spiffe://example.org"),))])
    # the string form still admits the trust domain, as documented
    policy = CallerPolicy.from_mapping({"/admin": ["spiffe://example.org"]})
    policy.check("spiffe://example.org/anyone", "/admin")
