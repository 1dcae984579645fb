from __future__ import annotations

import pytest

from gateway.config import Route, RouteMatch
from gateway.errors import BadRequest, MethodNotAllowed, NotFound
from gateway.routing import RouteTable, normalize_host, split_upstream

UP = "http://127.0.0.1:9000"


def route(
    name: str,
    *,
    path: str | None = None,
    prefix: str | None = None,
    host: str | None = None,
    methods: set[str] | None = None,
    upstream: str = UP,
    strip_prefix: bool = False,
) -> Route:
    return Route(
        name=name,
        match=RouteMatch(
            host=host,
            path=path,
            prefix=prefix,
            methods=frozenset(methods) if methods is not None else None,
        ),
        upstream=upstream,
        strip_prefix=strip_prefix,
    )


def names(table: RouteTable, host: str | None, method: str, paths: list[str]) -> list[str]:
    return [table.match(host, method, path).name for path in paths]


def test_prefix_is_segment_aware() -> None:
    table = RouteTable([route("jobs", prefix="/api/jobs")])
    for path in ("/api/jobs", "/api/jobs/", "/api/jobs/7", "/api/jobs//7", "/api/jobs/7/x"):
        assert table.match(None, "GET", path).name == "jobs"
    for path in ("/api/jobsx", "/api/job", "/api", "/", "/x/api/jobs"):
        with pytest.raises(NotFound):
            table.match(None, "GET", path)


def test_root_prefix_matches_everything() -> None:
    table = RouteTable([route("all", prefix="/")])
    assert names(table, None, "GET", ["/", "/a", "//", "//a", "/a/b/"]) == ["all"] * 5


def test_exact_path_is_exact() -> None:
    table = RouteTable([route("health", path="/healthz")])
    assert table.match(None, "GET", "/healthz").name == "health"
    for path in ("/healthz/", "/healthz/x", "/healthzz", "/"):
        with pytest.raises(NotFound):
            table.match(None, "GET", path)


def test_exact_beats_prefix_whatever_the_file_order() -> None:
    table = RouteTable([route("prefix", prefix="/api"), route("exact", path="/api/status")])
    assert table.match(None, "GET", "/api/status").name == "exact"
    assert table.match(None, "GET", "/api/status/x").name == "prefix"


def test_longer_prefix_beats_shorter_whatever_the_file_order() -> None:
    table = RouteTable(
        [route("root", prefix="/"), route("api", prefix="/api"), route("jobs", prefix="/api/jobs")]
    )
    assert names(table, None, "GET", ["/api/jobs/7", "/api/x", "/other", "/api/jobsx"]) == [
        "jobs",
        "api",
        "root",
        "api",
    ]


def test_route_with_methods_beats_one_without_then_file_order() -> None:
    table = RouteTable(
        [
            route("any-1", prefix="/api"),
            route("get-1", prefix="/api", methods={"GET"}),
            route("get-2", prefix="/api", methods={"GET", "POST"}),
            route("any-2", prefix="/api"),
        ]
    )
    assert table.match(None, "GET", "/api/x").name == "get-1"
    assert table.match(None, "POST", "/api/x").name == "get-2"
    assert table.match(None, "DELETE", "/api/x").name == "any-1"


def test_longer_prefix_beats_methods_on_a_shorter_one() -> None:
    table = RouteTable(
        [route("short", prefix="/api", methods={"GET"}), route("long", prefix="/api/jobs")]
    )
    assert table.match(None, "GET", "/api/jobs/1").name == "long"


def test_host_specific_beats_host_less_even_exact() -> None:
    table = RouteTable(
        [
            route("exact-any-host", path="/api/status"),
            route("host", prefix="/", host="api.example.com"),
        ]
    )
    assert table.match("api.example.com", "GET", "/api/status").name == "host"
    assert table.match("other.example.com", "GET", "/api/status").name == "exact-any-host"
    assert table.match(None, "GET", "/api/status").name == "exact-any-host"


def test_host_falls_back_to_host_less_routes() -> None:
    table = RouteTable(
        [route("host-jobs", prefix="/jobs", host="a.example"), route("any", prefix="/")]
    )
    assert table.match("a.example", "GET", "/jobs/1").name == "host-jobs"
    assert table.match("a.example", "GET", "/other").name == "any"


@pytest.mark.parametrize(
    "host",
    [
        "api.example.com",
        "API.Example.COM",
        "api.example.com.",
        "api.example.com:8443",
        "Api.Example.Com.:80",
    ],
)
def test_host_is_compared_case_insensitively_without_port_or_trailing_dot(host: str) -> None:
    table = RouteTable([route("host", prefix="/", host="api.example.com")])
    assert table.match(host, "GET", "/x").name == "host"


@pytest.mark.parametrize("host", [None, "", "example.com", "api.example.com.evil", "api.example"])
def test_route_with_host_does_not_match_other_hosts(host: str | None) -> None:
    table = RouteTable([route("host", prefix="/", host="api.example.com")])
    with pytest.raises(NotFound):
        table.match(host, "GET", "/x")


@pytest.mark.parametrize("config_host", ["[::1]", "::1"])
@pytest.mark.parametrize("host", ["[::1]:8080", "[::1]"])
def test_ipv6_hosts(config_host: str, host: str) -> None:
    table = RouteTable([route("v6", prefix="/", host=config_host)])
    assert table.match(host, "GET", "/").name == "v6"


@pytest.mark.parametrize(
    "host",
    [
        "::1",  # IPv6 must be bracketed in Host
        "admin.example:80:80",
        "admin.example, evil.example",
        "evil@admin.example",
        "admin.example/x",
        "admin example",
        "admin.example:",
    ],
)
def test_a_malformed_host_is_refused_whatever_the_routes(host: str) -> None:
    """Upstreams read such values differently (nginx and Express cut at the first ':')."""
    table = RouteTable([route("public", prefix="/")])
    with pytest.raises(BadRequest):
        table.match(host, "GET", "/")


def test_repeated_slashes_are_authorized_as_one() -> None:
    """nginx, Tomcat and Apache serve //admin as /admin: so must the decision."""
    table = RouteTable([route("public", prefix="/"), route("admin", prefix="/admin")])
    assert table.match(None, "GET", "//admin").name == "admin"
    assert table.match(None, "GET", "/x///admin").name == "public"
    assert table.match(None, "GET", "///admin//users").name == "admin"


def test_strip_prefix_counts_segments_across_repeated_slashes() -> None:
    r = route("api", prefix="/api", strip_prefix=True)
    table = RouteTable([r])
    assert table.forward_path(r, "//api//x") == "//x"
    assert table.forward_path(r, "/api/") == "/"


def test_normalize_host() -> None:
    assert normalize_host("Example.COM.:8080") == "example.com"
    assert normalize_host("[2001:DB8::1]:443") == "2001:db8::1"
    assert normalize_host("10.0.0.1:80") == "10.0.0.1"
    assert normalize_host("localhost") == "localhost"


def test_405_lists_the_methods_of_every_route_for_the_path() -> None:
    table = RouteTable(
        [
            route("read", prefix="/api/jobs", methods={"GET", "HEAD"}),
            route("write", prefix="/api/jobs", methods={"POST", "PUT"}),
            route("one", path="/api/jobs/1", methods={"DELETE"}),
            route("other", prefix="/api/invoices", methods={"PATCH"}),
        ]
    )
    with pytest.raises(MethodNotAllowed) as caught:
        table.match(None, "OPTIONS", "/api/jobs/1")
    assert caught.value.allow == ("DELETE", "GET", "HEAD", "POST", "PUT")
    assert caught.value.headers() == {"Allow": "DELETE, GET, HEAD, POST, PUT"}
    assert caught.value.status == 405


def test_405_includes_host_less_routes_behind_a_host_route() -> None:
    table = RouteTable(
        [
            route("h", prefix="/", host="a.example", methods={"GET"}),
            route("any", prefix="/x", methods={"POST"}),
        ]
    )
    with pytest.raises(MethodNotAllowed) as caught:
        table.match("a.example", "PUT", "/x")
    assert caught.value.allow == ("GET", "POST")


def test_head_is_not_implied_by_get() -> None:
    table = RouteTable([route("read", prefix="/api", methods={"GET"})])
    with pytest.raises(MethodNotAllowed) as caught:
        table.match(None, "HEAD", "/api")
    assert caught.value.allow == ("GET",)


def test_a_route_without_methods_behind_wins_over_405() -> None:
    table = RouteTable(
        [route("get", prefix="/api/jobs", methods={"GET"}), route("root", prefix="/")]
    )
    assert table.match(None, "POST", "/api/jobs").name == "root"


def test_404_when_no_route_has_the_path() -> None:
    table = RouteTable([route("a", prefix="/a", methods={"GET"})])
    with pytest.raises(NotFound) as caught:
        table.match(None, "GET", "/b")
    assert caught.value.status == 404
    with pytest.raises(NotFound):
        RouteTable([]).match(None, "GET", "/")


def test_encoded_unreserved_characters_do_not_dodge_a_route() -> None:
    table = RouteTable(
        [route("public", prefix="/"), route("admin", prefix="/admin", methods={"GET"})]
    )
    for path in ("/admin", "/%61dmin", "/%61%64%6D%69%6E/x", "/%61dmin/"):
        assert table.match(None, "GET", path).name == "admin"
    # an escape of a reserved character is not the same path
    assert table.match(None, "GET", "/admin%3F").name == "public"


def test_configured_paths_are_normalized_too() -> None:
    table = RouteTable([route("tilde", prefix="/%7Euser"), route("sp", path="/a%2fb%20c")])
    assert table.match(None, "GET", "/~user/x").name == "tilde"
    assert table.match(None, "GET", "/%7euser").name == "tilde"
    assert table.match(None, "GET", "/a%2Fb%20c").name == "sp"


def test_match_returns_the_config_route_object() -> None:
    r = route("a", prefix="/a")
    assert RouteTable.compile([r]).match(None, "GET", "/a/b") is r


@pytest.mark.parametrize(
    ("upstream", "prefix", "strip", "path", "expected"),
    [
        (UP, "/api/jobs", True, "/api/jobs/7", "/7"),
        (UP, "/api/jobs", True, "/api/jobs", "/"),
        (UP, "/api/jobs", True, "/api/jobs/", "/"),
        (UP, "/api/jobs", True, "/api/jobs//7", "//7"),
        (UP, "/api/jobs", False, "/api/jobs/7", "/api/jobs/7"),
        (UP, "/", True, "/x/y", "/x/y"),
        (UP + "/base", "/api", True, "/api/x", "/base/x"),
        (UP + "/base", "/api", True, "/api", "/base/"),
        (UP + "/base/", "/api", False, "/api/x", "/base/api/x"),
        (UP + "/", "/api", False, "/api/x", "/api/x"),
        (UP, "/api", True, "/%61pi/x%20y", "/x%20y"),
    ],
)
def test_forward_path(upstream: str, prefix: str, strip: bool, path: str, expected: str) -> None:
    r = route("r", prefix=prefix, upstream=upstream, strip_prefix=strip)
    table = RouteTable([r])
    assert table.match(None, "GET", path) is r
    assert table.forward_path(r, path) == expected


def test_forward_path_of_an_exact_route_is_never_stripped() -> None:
    r = route("r", path="/healthz", upstream=UP + "/svc", strip_prefix=True)
    assert RouteTable([r]).forward_path(r, "/healthz") == "/svc/healthz"


def test_split_upstream() -> None:
    assert split_upstream("http://h:1") == ("http://h:1", "")
    assert split_upstream("https://h:1/a/b/") == ("https://h:1", "/a/b")
    assert split_upstream("http://h:1/a%20b") == ("http://h:1", "/a%20b")


def test_upstream_url_keeps_the_query_and_the_encoding() -> None:
    r = Route(name="r", match=RouteMatch(prefix="/api"), upstream="http://h:1/base")
    table = RouteTable([r])
    assert table.upstream_url(r, "/api/a%20b", "x=1&y=%2F") == "http://h:1/base/api/a%20b?x=1&y=%2F"
    assert table.upstream_url(r, "/api", "") == "http://h:1/base/api"
