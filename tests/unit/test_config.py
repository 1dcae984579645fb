"""gateway.config: schema, defaults, durations, sizes, ${VAR} expansion, all-errors reporting."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from pathlib import Path
from typing import Any

import pytest

from gateway import config as config_module
from gateway.config import (
    Cache,
    Config,
    Route,
    RouteMatch,
    Tokens,
    load_config,
    parse_config,
)
from gateway.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "gateway.yaml"
UPSTREAM = "http://127.0.0.1:9000"


def route(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "r", "match": {"prefix": "/api"}, "upstream": UPSTREAM}
    return base | overrides


def errors_of(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return list(info.value.errors)


def only_error(data: Any) -> str:
    errors = errors_of(data)
    assert len(errors) == 1, errors
    return errors[0]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("PATGATE_"):
            monkeypatch.delenv(name)
    return monkeypatch


def write(tmp_path: Path, text: str, name: str = "gw.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# Defaults -----------------------------------------------------------------------------------


def test_empty_config_is_all_defaults() -> None:
    assert parse_config({}) == Config()
    assert parse_config(None) == Config()


def test_defaults_come_from_the_dataclasses() -> None:
    cfg = parse_config({"tokens": {"prefix": "fdp_"}, "cache": {"ttl": "10s"}})
    assert cfg.tokens == dataclasses.replace(Tokens(), prefix="fdp_")
    assert cfg.cache == dataclasses.replace(Cache(), ttl=10.0)
    assert cfg.tokens.default_ttl == 365 * 86400.0
    assert cfg.listen.port == 8080
    assert cfg.admin_listen.host == "127.0.0.1"


def test_route_defaults_and_normalisation() -> None:
    cfg = parse_config(
        {
            "routes": [
                route(
                    match={"prefix": "/api/jobs/", "host": "API.Example.COM.", "methods": ["get"]},
                    upstream="HTTPS://svc:8443/base/",
                )
            ]
        }
    )
    assert cfg.routes == (
        Route(
            name="r",
            match=RouteMatch(
                host="api.example.com", prefix="/api/jobs", methods=frozenset({"GET"})
            ),
            upstream="https://svc:8443/base",
        ),
    )
    only = cfg.routes[0]
    assert (only.timeout, only.connect_timeout, only.websocket, only.public) == (60, 5, True, False)


def test_root_prefix_keeps_its_slash() -> None:
    cfg = parse_config({"routes": [route(match={"prefix": "/"})]})
    assert cfg.routes[0].match.prefix == "/"


def test_every_schema_key_is_a_dataclass_field() -> None:
    schema = config_module._CONFIG
    assert set(schema) == {f.name for f in dataclasses.fields(Config)} - {"source"}
    assert set(config_module._ROUTE) == {f.name for f in dataclasses.fields(Route)}


# Durations and sizes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("12h", 43200.0),
        ("365d", 365 * 86400.0),
        ("1.5h", 5400.0),
        (45, 45.0),
        (2.5, 2.5),
        ("0s", 0.0),
    ],
)
def test_duration_forms(given: object, seconds: float) -> None:
    assert parse_config({"cache": {"ttl": given}}).cache.ttl == seconds


@pytest.mark.parametrize("given", ["banana", "30", "30 sec", "-5s", True, [], "1e3s"])
def test_bad_durations(given: object) -> None:
    assert only_error({"cache": {"ttl": given}}).startswith("cache.ttl: ")


def test_duration_messages() -> None:
    assert only_error({"cache": {"ttl": "banana"}}) == (
        'cache.ttl: expected a duration like 30s, got "banana"'
    )
    assert "greater than 0" in only_error({"usage": {"flush_interval": "0s"}})
    assert "at least 0" in only_error({"cache": {"ttl": -1}})


def test_null_duration_only_where_optional() -> None:
    assert parse_config({"tokens": {"max_ttl": None}}).tokens.max_ttl is None
    assert parse_config({"tokens": {"default_ttl": None}}).tokens.default_ttl is None
    assert only_error({"cache": {"ttl": None}}).startswith("cache.ttl: expected a duration")


@pytest.mark.parametrize(
    ("given", "size"),
    [
        (1234, 1234),
        ("512", 512),
        ("10KB", 10_000),
        ("10KiB", 10_240),
        ("5MB", 5_000_000),
        ("5MiB", 5 * 2**20),
        ("1GB", 10**9),
        ("1GiB", 2**30),
        (None, None),
    ],
)
def test_size_forms(given: object, size: int | None) -> None:
    cfg = parse_config({"routes": [route(max_body=given)]})
    assert cfg.routes[0].max_body == size


@pytest.mark.parametrize("given", ["lots", -1, "10 XB", True])
def test_bad_sizes(given: object) -> None:
    assert only_error({"routes": [route(max_body=given)]}).startswith("routes[0].max_body: ")


# Types, ranges and cross-field rules --------------------------------------------------------


def test_string_yes_is_not_a_boolean() -> None:
    assert only_error({"logging": {"access_log": "yes"}}) == (
        'logging.access_log: expected a boolean, got "yes"'
    )


def test_unknown_key_suggests_the_close_name() -> None:
    error = only_error({"routes": [route(match={"pth": "/x", "prefix": "/api"})]})
    assert error == 'routes[0].match.pth: unknown key (did you mean "path"?)'
    assert only_error({"zzz": 1}) == "zzz: unknown key"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"listen": {"port": 70000}}, "listen.port: must be between 0 and 65535, got 70000"),
        ({"listen": {"port": "80"}}, 'listen.port: expected an integer, got "80"'),
        ({"database": {"pool": {"min": 5, "max": 2}}}, "database.pool.min: 5 exceeds"),
        ({"database": {"pool": {"max": 0}}}, "database.pool.max: must be at least 1"),
        ({"tokens": {"prefix": "pat"}}, "tokens.prefix: expected letters and digits"),
        ({"tokens": {"prefix": "a2345678901234567_"}}, "tokens.prefix: expected"),
        ({"tokens": {"max_ttl": "30d"}}, "tokens.default_ttl: must not exceed tokens.max_ttl"),
        (
            {"tokens": {"default_ttl": None, "allow_no_expiry": False}},
            "tokens.default_ttl: null (no expiry) needs tokens.allow_no_expiry",
        ),
        ({"tokens": {"max_active_per_user": 0}}, "tokens.max_active_per_user: must be at least"),
        ({"tokens": {"on_excess_role": "drop"}}, "tokens.on_excess_role: expected strip or refuse"),
        ({"tokens": {"pepper": ["ok", ""]}}, "tokens.pepper[1]: expected a non-empty string"),
        ({"cache": {"max_entries": 0}}, "cache.max_entries: must be at least 1"),
        ({"trusted_proxies": ["10.0.0.0/8", "nope"]}, "trusted_proxies[1]: expected a CIDR"),
        ({"identity_headers": {"role": "Bad Header"}}, "identity_headers.role: expected an HTTP"),
        (
            {"identity_headers": {"role": "x-auth-user-id"}},
            "identity_headers.role: same as identity_headers.user_id",
        ),
        ({"logging": {"level": "verbose"}}, "logging.level: expected debug, info, warning"),
        ({"roles": {"Admin": ["x"]}}, "roles.Admin: a role name"),
        ({"roles": {"admin": "jobs:read"}}, 'roles.admin: expected a list, got "jobs:read"'),
        ({"management": {"sessions": {"claims": {"user": ""}}}}, "management.sessions.claims.user"),
        ({"routes": {"name": "x"}}, "routes: expected a list, got a mapping"),
        ([1, 2], "config: expected a mapping, got a list"),
    ],
)
def test_single_mistakes(data: Any, expected: str) -> None:
    assert only_error(data).startswith(expected)


def test_max_ttl_equal_to_default_is_fine() -> None:
    tokens = parse_config({"tokens": {"default_ttl": "90d", "max_ttl": "90d"}}).tokens
    assert tokens.default_ttl == tokens.max_ttl == 90 * 86400.0


def test_secrets_are_never_echoed() -> None:
    error = only_error({"database": {"url": 123456789}})
    assert "123456789" not in error
    assert error.startswith("database.url: ")
    error = only_error({"routes": [route(upstream="http://user:hunter2@svc")]})
    assert "hunter2" not in error


def test_trusted_proxies_are_networks() -> None:
    cfg = parse_config({"trusted_proxies": ["10.1.2.3/8", "::1", "192.168.0.7"]})
    assert cfg.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("192.168.0.7/32"),
    )


@pytest.mark.parametrize("permission", ["*", "jobs:*", "jobs:read", "a.b-c_d:e", "x"])
def test_valid_permissions(permission: str) -> None:
    roles = parse_config({"roles": {"r": [permission]}}).roles
    assert roles == {"r": frozenset({permission})}


@pytest.mark.parametrize("permission", ["Jobs:read", "jobs:", ":read", "*:read", "jobs read", 1])
def test_invalid_permissions(permission: object) -> None:
    assert only_error({"roles": {"r": ["ok", permission]}}).startswith("roles.r[1]: expected")


# Routes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"match": {"path": "/a", "prefix": "/b"}}, "routes[0].match: set path or prefix"),
        ({"match": {"methods": ["GET"]}}, "routes[0].match: needs path or prefix"),
        ({"match": {"prefix": "api"}}, "routes[0].match.prefix: expected a path"),
        ({"match": {"path": "/a/../b"}}, "routes[0].match.path: expected a path"),
        ({"match": {"prefix": "/a", "methods": []}}, "routes[0].match.methods: must not be empty"),
        ({"match": {"prefix": "/a", "methods": ["G T"]}}, "routes[0].match.methods[0]"),
        ({"name": "bad name"}, "routes[0].name: expected a name"),
        ({"upstream": "ftp://svc"}, "routes[0].upstream: expected a URL"),
        ({"upstream": "http://svc/?q=1"}, "routes[0].upstream: expected a URL"),
        ({"upstream": "http://svc:99999"}, "routes[0].upstream: expected a URL"),
        ({"upstream": "http:///path"}, "routes[0].upstream: expected a URL"),
        ({"public": True, "require": ["a:b"]}, "routes[0].public: public routes cannot require"),
        ({"public": True, "require_any": ["a:b"]}, "routes[0].public: public routes cannot"),
        (
            {"strip_prefix": True, "match": {"path": "/a"}},
            "routes[0].strip_prefix: only applies to match.prefix",
        ),
        ({"timeout": "0s"}, "routes[0].timeout: must be greater than 0"),
        ({"connect_timeout": -1}, "routes[0].connect_timeout: must be greater than 0"),
        ({"websocket": "no"}, 'routes[0].websocket: expected a boolean, got "no"'),
        (
            {"match": {"prefix": "/", "host": "api.example.com:8080"}},
            "routes[0].match.host: expected a host",
        ),
        (
            {"match": {"prefix": "/", "host": "*.example.com"}},
            "routes[0].match.host: expected a host",
        ),
        (
            {"set_request_headers": {"Connection": "x"}},
            "routes[0].set_request_headers.Connection: cannot",
        ),
        (
            {"set_request_headers": {"Proxy-Foo": "x"}},
            "routes[0].set_request_headers.Proxy-Foo: cannot",
        ),
        (
            {"set_request_headers": {"x_auth_role": "x"}},
            "routes[0].set_request_headers.x_auth_role: cannot",
        ),
        ({"set_request_headers": {"X-A": "a\r\nB: c"}}, "routes[0].set_request_headers.X-A:"),
        (
            {"set_request_headers": {"X-A": "1", "x-a": "2"}},
            "routes[0].set_request_headers.x-a: sets the same",
        ),
        ({"remove_request_headers": ["Bad Name"]}, "routes[0].remove_request_headers[0]"),
    ],
)
def test_route_mistakes(overrides: dict[str, Any], expected: str) -> None:
    assert only_error({"routes": [route(**overrides)]}).startswith(expected)


def test_route_required_keys() -> None:
    errors = errors_of({"routes": [{}]})
    assert errors == [
        "routes[0].name: required",
        "routes[0].match: required",
        "routes[0].upstream: required",
    ]


def test_set_request_headers_keep_file_order() -> None:
    headers = {"X-Zeta": "1", "X-Alpha": "2", "X-Tenant": "acme"}
    cfg = parse_config({"routes": [route(set_request_headers=headers)]})
    assert cfg.routes[0].set_request_headers == (
        ("X-Zeta", "1"),
        ("X-Alpha", "2"),
        ("X-Tenant", "acme"),
    )


def test_identity_header_check_follows_configured_names() -> None:
    data = {
        "identity_headers": {"role": "X-Gateway-Role"},
        "routes": [route(set_request_headers={"X-Auth-Role": "ok"})],
    }
    assert parse_config(data).routes[0].set_request_headers == (("X-Auth-Role", "ok"),)
    data["routes"] = [route(set_request_headers={"x-gateway-role": "no"})]
    assert "cannot set an identity header" in only_error(data)


def test_every_mistake_is_reported_at_once() -> None:
    data = {
        "listen": {"prot": 8080},
        "roles": {"admin": ["jobs:read", "Jobs:Write"]},
        "routes": [
            route(name="a"),
            route(name="b", match={"path": "/x", "prefix": "/y"}),
            route(name="c", timeout="banana"),
            route(name="a"),
        ],
    }
    errors = errors_of(data)
    assert sorted(errors) == sorted(
        [
            'listen.prot: unknown key (did you mean "port"?)',
            'roles.admin[1]: expected a permission like "jobs:read", "jobs:*" or "*", '
            'got "Jobs:Write"',
            "routes[1].match: set path or prefix, not both",
            'routes[2].timeout: expected a duration like 30s, got "banana"',
            'routes[3].name: duplicate name "a" (first at routes[0])',
        ]
    )
    assert str(ConfigError(errors)).count("\n") == 4


def test_an_invalid_route_entry_keeps_later_indexes() -> None:
    data = {"routes": ["oops", route(set_request_headers={"Upgrade": "x"})]}
    assert errors_of(data) == [
        'routes[0]: expected a route mapping, got "oops"',
        "routes[1].set_request_headers.Upgrade: cannot set a hop-by-hop header",
    ]


# Loading and ${VAR} expansion ----------------------------------------------------------------


def test_example_config_loads_with_defaults(clean_env: pytest.MonkeyPatch) -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.source == str(EXAMPLE)
    assert (cfg.listen.host, cfg.listen.port) == ("0.0.0.0", 8080)
    assert (cfg.admin_listen.host, cfg.admin_listen.port) == ("127.0.0.1", 9191)
    assert cfg.database.url == ""
    assert cfg.management.sessions.hs256_secret == ""
    assert cfg.tokens == Tokens()
    assert cfg.cache == Cache()
    assert set(cfg.roles) == {"owner", "admin", "full_user", "field_user"}
    assert cfg.roles["field_user"] == frozenset({"jobs:read"})
    assert cfg.roles["owner"] == frozenset({"*"})
    routes = {r.name: r for r in cfg.routes}
    assert list(routes) == ["health", "jobs-read", "jobs-write", "invoices-read", "echo"]
    assert all(r.upstream == UPSTREAM for r in cfg.routes)
    assert routes["health"].public
    assert routes["health"].match.path == "/healthz"
    assert routes["jobs-read"].match.methods == frozenset({"GET", "HEAD"})
    assert routes["jobs-read"].require == ("jobs:read",)
    assert routes["jobs-write"].match.methods == frozenset({"POST", "PUT", "PATCH", "DELETE"})
    assert (routes["jobs-write"].require, routes["jobs-write"].timeout) == (("jobs:write",), 30.0)
    assert routes["invoices-read"].match == RouteMatch(
        prefix="/api/invoices", methods=frozenset({"GET"})
    )
    echo = routes["echo"]
    assert (echo.match.prefix, echo.public, echo.require, echo.match.methods) == (
        "/api",
        False,
        (),
        None,
    )


def test_example_config_takes_env(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("PATGATE_PORT", "8181")
    clean_env.setenv("PATGATE_UPSTREAM", "http://backend:7000/")
    clean_env.setenv("PATGATE_DATABASE_URL", "postgresql://u:p@db/patgate")
    cfg = load_config(EXAMPLE)
    assert cfg.listen.port == 8181
    assert isinstance(cfg.listen.port, int)
    assert {r.upstream for r in cfg.routes} == {"http://backend:7000"}
    assert cfg.database.url == "postgresql://u:p@db/patgate"


def test_default_path_and_env_var(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.chdir(REPO)
    assert load_config().source == "config/gateway.yaml"
    other = write(tmp_path, "listen: {host: 127.0.0.1, port: 1234}\n")
    clean_env.setenv("PATGATE_CONFIG", str(other))
    assert load_config().listen.port == 1234
    assert load_config(EXAMPLE).listen.port == 8080  # an explicit path wins


def test_expansion_forms(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("PATGATE_HOST", "db.internal")
    clean_env.setenv("PATGATE_EMPTY", "")
    path = write(
        tmp_path,
        "database:\n"
        "  url: postgresql://${PATGATE_HOST}/x\n"
        "  data_dir: ${PATGATE_NOPE:-/var/lib/patgate}\n"
        "management:\n"
        "  sessions:\n"
        "    cookie: ${PATGATE_EMPTY:-sess}\n"  # like the shell: empty takes the default
        "    hs256_secret: a$${literal}b$x\n",
    )
    cfg = load_config(path)
    assert cfg.database.url == "postgresql://db.internal/x"
    assert cfg.database.data_dir == "/var/lib/patgate"
    assert cfg.management.sessions.cookie == "sess"
    assert cfg.management.sessions.hs256_secret == "a${literal}b$x"


def test_expanded_strings_become_numbers_and_booleans(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clean_env.setenv("PATGATE_ADMIN_PORT", "0")
    clean_env.setenv("PATGATE_LOG", "False")
    clean_env.setenv("PATGATE_TTL", "45")
    path = write(
        tmp_path,
        "admin_listen: {host: 127.0.0.1, port: '${PATGATE_ADMIN_PORT}'}\n"
        "logging: {access_log: '${PATGATE_LOG}'}\n"
        "cache: {ttl: '${PATGATE_TTL}', max_entries: '${PATGATE_MAX:-50}'}\n"
        "tokens: {max_ttl: '${PATGATE_MAX_TTL:-}'}\n",
    )
    cfg = load_config(path)
    assert cfg.admin_listen.port == 0
    assert cfg.logging.access_log is False
    assert cfg.cache.ttl == 45.0
    assert cfg.cache.max_entries == 50
    assert cfg.tokens.max_ttl is None


def test_a_literal_numeric_string_is_still_an_error(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = write(tmp_path, "listen: {port: '8080'}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == ('listen.port: expected an integer, got "8080"',)


def test_expanded_value_is_never_yaml(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("PATGATE_INJECT", "x\nrouters: []")
    path = write(tmp_path, "database: {data_dir: '${PATGATE_INJECT}'}\n")
    assert load_config(path).database.data_dir == "x\nrouters: []"


def test_unset_variable_names_the_key(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "database: {url: '${PATGATE_X}'}\n"
        "listen: {port: '${PATGATE_PORT_UNSET}'}\n"
        "cache: {ttl: banana}\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    # Reported once, as missing (not also as "expected an integer"), and other errors still come.
    assert info.value.errors == (
        "database.url: environment variable PATGATE_X is not set",
        "listen.port: environment variable PATGATE_PORT_UNSET is not set",
        'cache.ttl: expected a duration like 30s, got "banana"',
    )


def test_malformed_reference(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = write(tmp_path, "database: {url: '${1BAD}'}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors[0].startswith("database.url: malformed ${...}")


def test_empty_reference_in_a_list_is_dropped(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = write(
        tmp_path, "tokens:\n  pepper:\n    - ${PATGATE_PEPPER:-}\n    - ${PATGATE_OLD:-}\n"
    )
    assert load_config(path).tokens.pepper == ()
    clean_env.setenv("PATGATE_PEPPER", "new-secret")
    assert load_config(path).tokens.pepper == ("new-secret",)
    # A literal empty string is still a mistake.
    with pytest.raises(ConfigError, match=r"tokens\.pepper\[0\]"):
        load_config(write(tmp_path, "tokens: {pepper: ['']}\n", "literal.yaml"))


def test_empty_file_gives_defaults(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = write(tmp_path, "# nothing here\n")
    assert load_config(path) == dataclasses.replace(Config(), source=str(path))


def test_yaml_syntax_error_names_file_and_line(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = write(tmp_path, "cache:\n  ttl: 30s\nlisten:\n  host: a: b\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (message,) = info.value.errors
    assert message.startswith(f"{path}: line 4, column ")
    assert "invalid YAML" in message
    assert "\n" not in message


def test_missing_file_is_one_line(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert info.value.errors == (f"{missing}: cannot read: No such file or directory",)
