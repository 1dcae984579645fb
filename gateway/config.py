"""Configuration: YAML → frozen, typed structs, validated and compiled once at start.

Every duration is stored in seconds (float); every size in bytes (int).

`load_config` reads the file, expands `${VAR}` / `${VAR:-default}` in every string scalar
(after parsing, so an environment value can never inject YAML structure; `$${` is a literal
`${`), then `parse_config` checks the plain data against the declarative schemas below and
raises one ConfigError listing every problem, each prefixed by its key path
(`routes[2].timeout: expected a duration like 30s, got "banana"`). Defaults live only in the
dataclasses: a section starts from its default instance and replaces the keys present.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, TypeVar
from urllib.parse import urlsplit

import yaml

from gateway.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

DEFAULT_CONFIG_PATH = "config/gateway.yaml"
CONFIG_ENV = "PATGATE_CONFIG"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Pool:
    min: int = 1
    max: int = 10


@dataclass(frozen=True, slots=True)
class Database:
    url: str = ""  # empty → embedded PostgreSQL (development only)
    data_dir: str = ".patgate"
    pool: Pool = field(default_factory=Pool)


@dataclass(frozen=True, slots=True)
class Tokens:
    prefix: str = "pat_"
    default_ttl: float | None = 365 * 86400.0  # None → tokens never expire by default
    max_ttl: float | None = None
    allow_no_expiry: bool = True
    max_active_per_user: int | None = None
    refresh_extends: float = 365 * 86400.0
    rotation_grace: float = 0.0
    revoke_on_downgrade: bool = True
    on_excess_role: Literal["strip", "refuse"] = "strip"
    pepper: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Cache:
    ttl: float = 30.0
    negative_ttl: float = 5.0
    max_entries: int = 100_000
    negative_max_entries: int = 10_000
    stale_if_error: float = 0.0


@dataclass(frozen=True, slots=True)
class Usage:
    flush_interval: float = 5.0


@dataclass(frozen=True, slots=True)
class Assertion:
    """A short-lived ES256 JWT of the identity, so an upstream can refuse bypassed traffic."""

    header: str = "X-Auth-Assertion"
    key_files: tuple[str, ...] = ()  # PEM EC P-256 private keys: the first signs, all published
    ttl: float = 60.0


@dataclass(frozen=True, slots=True)
class IdentityHeaders:
    user_id: str = "X-Auth-User-Id"
    company_id: str = "X-Auth-Company-Id"
    token_id: str = "X-Auth-Token-Id"
    role: str = "X-Auth-Role"
    permissions: str = "X-Auth-Permissions"
    request_id: str = "X-Request-Id"
    assertion: Assertion | None = None  # off unless configured

    def names(self) -> dict[str, str]:
        """Every configured header name by its key (the assertion's too, when on)."""
        names = {f: getattr(self, f) for f in HEADER_FIELDS}
        if self.assertion is not None:
            names["assertion"] = self.assertion.header
        return names


HEADER_FIELDS = ("user_id", "company_id", "token_id", "role", "permissions", "request_id")


@dataclass(frozen=True, slots=True)
class SessionClaims:
    user: str = "sub"
    company: str = "company_id"
    role: str = "role"


@dataclass(frozen=True, slots=True)
class Sessions:
    cookie: str = "patgate_session"
    hs256_secret: str = ""
    jwks_file: str | None = None
    issuer: str | None = None
    audience: str | None = None
    claims: SessionClaims = field(default_factory=SessionClaims)
    require_mfa_for_create: bool = True
    mfa_values: tuple[str, ...] = ("mfa", "otp", "totp", "hwk", "swk")


@dataclass(frozen=True, slots=True)
class Management:
    enabled: bool = True
    allow_pat: bool = False
    sessions: Sessions = field(default_factory=Sessions)


@dataclass(frozen=True, slots=True)
class Logging:
    level: str = "info"  # debug | info | warning | error
    access_log: bool = True


@dataclass(frozen=True, slots=True)
class RouteMatch:
    host: str | None = None  # lower-cased, trailing dot removed
    path: str | None = None  # exact path
    prefix: str | None = None  # segment-aware prefix, no trailing slash (except "/")
    methods: frozenset[str] | None = None  # upper-cased; None = all methods


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    match: RouteMatch
    upstream: str  # http(s)://host:port[/base], no trailing slash
    public: bool = False
    require: tuple[str, ...] = ()
    require_any: tuple[str, ...] = ()
    strip_prefix: bool = False
    timeout: float = 60.0
    connect_timeout: float = 5.0
    preserve_host: bool = False
    websocket: bool = True
    forward_authorization: bool = False
    set_request_headers: tuple[tuple[str, str], ...] = ()
    remove_request_headers: tuple[str, ...] = ()
    max_body: int | None = None


@dataclass(frozen=True, slots=True)
class Config:
    listen: Listen = field(default_factory=lambda: Listen("0.0.0.0", 8080))
    admin_listen: Listen = field(default_factory=lambda: Listen("127.0.0.1", 9191))
    database: Database = field(default_factory=Database)
    tokens: Tokens = field(default_factory=Tokens)
    cache: Cache = field(default_factory=Cache)
    usage: Usage = field(default_factory=Usage)
    trusted_proxies: tuple[IPNetwork, ...] = ()
    identity_headers: IdentityHeaders = field(default_factory=IdentityHeaders)
    management: Management = field(default_factory=Management)
    logging: Logging = field(default_factory=Logging)
    roles: Mapping[str, frozenset[str]] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()
    source: str | None = None  # the file it came from, for messages


# Validation machinery: scalar converters raise _Invalid (the caller adds the key path);
# _Custom converters (lists, free-form mappings) report their own errors.

_Scalar: TypeAlias = Callable[[Any], Any]
_D = TypeVar("_D", bound="DataclassInstance")
_T = TypeVar("_T")

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PERMISSION = r"\*|[a-z0-9_.-]+(?::[a-z0-9_.-]+)*(?::\*)?"
_PATH = r"(?!.*(?:^|/)\.\.?(?:/|$))/[^?#\s\x00-\x1f\x7f]*"  # absolute, no . or .. segments
_DURATION = re.compile(r"(-?[0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([kmgt]i?b|b)?", re.IGNORECASE)
_SIZE_UNITS = {"b": 1} | {
    f"{unit}{i}b": (1024 if i else 1000) ** (n + 1)
    for n, unit in enumerate("kmgt")
    for i in ("", "i")
}
_REFERENCE = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_REFERENCE_BODY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-((?:[^$]|\$(?!\{))*))?", re.DOTALL)
_SINGLE_REFERENCE = re.compile(r"\$\{[^}]*\}")


class _Invalid(ValueError):
    """A converter's complaint about one value."""


class _Expanded(str):
    """A string that contained ${...}: an integer or boolean may be read from it."""

    __slots__ = ()


class _Errors:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path or 'config'}: {message}")

    def clean(self, *paths: str) -> bool:
        """True when nothing was reported at or below any of these paths."""
        starts = tuple(f"{p}{sep}" for p in paths for sep in (":", ".", "["))
        return not any(item.startswith(starts) for item in self.items)


@dataclass(frozen=True, slots=True)
class _Custom:
    fn: Callable[[_Errors, str, Any], Any]


_Schema: TypeAlias = Mapping[str, "_Scalar | _Custom | _Schema"]


def _key(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _show(value: object) -> str:
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, Mapping | list):
        return "a mapping" if isinstance(value, Mapping) else "a list"
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


# Header names, here because the config validates them and gateway.headers (which imports
# this module) strips by them: one definition for both.
HOP_BY_HOP: frozenset[str] = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


def normalize_name(name: str) -> str:
    """``X_Auth_User`` → ``x-auth-user``: the form every header comparison uses."""
    return name.lower().replace("_", "-")


def is_hop_by_hop(normalized: str) -> bool:
    return normalized in HOP_BY_HOP or normalized.startswith("proxy-")


def _text(
    what: str, pattern: str = r"(?s).*", *, secret: bool = False, then: Callable[[str], str] = str
) -> _Scalar:
    """A string matching `pattern`, passed through `then`; a secret is never echoed."""
    regex = re.compile(pattern)

    def convert(value: Any) -> str:
        if not isinstance(value, str) or not regex.fullmatch(value):
            got = " (value not shown)" if secret else f", got {_show(value)}"
            raise _Invalid(f"expected {what}{got}")
        return then(str(value))  # str(): a plain str, never an _Expanded

    return convert


def _bool(value: Any) -> bool:
    if isinstance(value, _Expanded) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise _Invalid(f"expected a boolean, got {_show(value)}")
    return value


def _int(low: int, high: int | None = None) -> _Scalar:
    def convert(value: Any) -> int:
        if isinstance(value, _Expanded) and re.fullmatch(r"\s*[0-9]+\s*", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"expected an integer, got {_show(value)}")
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise _Invalid(f"must be {bound}, got {value}")
        return value

    return convert


def _duration(value: Any, *, positive: bool = False) -> float:
    seconds = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.fullmatch(value.strip())):
        # A bare number in a string is seconds only when it came from ${...}.
        seconds = float(m[1]) * _DURATION_UNITS[m[2] or "s"]
        seconds = seconds if m[2] or isinstance(value, _Expanded) else None
    if seconds is None or not math.isfinite(seconds):
        raise _Invalid(f"expected a duration like 30s, got {_show(value)}")
    if seconds < 0 or (positive and seconds == 0):
        bound = "greater than 0" if positive else "at least 0"
        raise _Invalid(f"must be {bound}, got {_show(value)}")
    return seconds


def _positive_duration(value: Any) -> float:
    return _duration(value, positive=True)


def _size(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and (m := _SIZE.fullmatch(value.strip())):
        return int(Fraction(m[1]) * _SIZE_UNITS[(m[2] or "b").lower()])
    raise _Invalid(f"expected a size like 512, 10KB, 10KiB or 5MiB, got {_show(value)}")


def _optional(convert: _Scalar) -> _Scalar:
    """null is allowed, and so is a ${...} that expands to nothing."""
    return lambda v: None if v is None or (isinstance(v, _Expanded) and not v) else convert(v)


def _upstream(value: Any) -> str:
    text = _text("a URL like http://host:port[/base]", r"\S+")(value)
    if "@" in text:  # not echoed: it may carry a password
        raise _Invalid("must not contain user:password@ (value not shown)")
    parts = urlsplit(text)
    try:
        ok = parts.scheme.lower() in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is not a number in range
        ok = False
    if not ok or "?" in text or "#" in text:
        raise _Invalid(f"expected a URL like http://host:port[/base], got {_show(value)}")
    return f"{parts.scheme.lower()}://{parts.netloc}{parts.path.rstrip('/')}"


def _network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(_string(value).strip(), strict=False)
    except (ValueError, _Invalid):
        raise _Invalid(f"expected a CIDR like 10.0.0.0/8 or an IP, got {_show(value)}") from None


_string = _text("a string")
_nonempty = _text("a non-empty string", r"(?s).*\S.*")
_secret = _text("a string", secret=True)
_header = _text("an HTTP header name like X-Auth-User-Id", _TOKEN)
_permission = _text('a permission like "jobs:read", "jobs:*" or "*"', _PERMISSION)
_method = _text("an HTTP method like GET", _TOKEN, then=str.upper)
_header_value = _text("a string without CR, LF or NUL", r"[^\r\n\x00]*")
# A name (a trailing dot allowed) or a bracketed IPv6 address: requests are matched by their
# Host without its port, so a port or a wildcard here would make a route that never matches.
_host = _text(
    "a host name like api.example.com (no port, no wildcard)",
    r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62}))*\.?"
    r"|\[[0-9A-Fa-f:.]{2,45}\]",
    then=lambda h: h.lower().removesuffix("."),
)


# Structural converters -------------------------------------------------------------------


def _mapping(
    errs: _Errors, path: str, raw: Any, allowed: Mapping[str, Any] | None
) -> dict[Any, Any]:
    if not isinstance(raw, Mapping):
        errs.add(path, f"expected a mapping, got {_show(raw)}")
        return {}
    known: dict[Any, Any] = {}
    for key, value in raw.items():
        if allowed is None or key in allowed:
            known[key] = value
        else:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            errs.add(_key(path, key), f"unknown key{hint}")
    return known


def _build(errs: _Errors, path: str, raw: Any, default: _D, schema: _Schema) -> _D:
    """The default instance with every valid key of `raw` replaced; null keeps the defaults."""
    changes: dict[str, Any] = {}
    for key, value in _mapping(errs, path, {} if raw is None else raw, schema).items():
        spec, at = schema[key], _key(path, key)
        if isinstance(spec, _Custom):
            changes[key] = spec.fn(errs, at, value)
        elif isinstance(spec, Mapping):
            changes[key] = _build(errs, at, value, getattr(default, key), spec)
        else:
            try:
                changes[key] = spec(value)
            except _Invalid as exc:
                errs.add(at, str(exc))
    return dataclasses.replace(default, **changes)


def _items(errs: _Errors, path: str, raw: Any, convert: Callable[[Any], _T]) -> list[_T]:
    if not isinstance(raw, list):
        errs.add(path, f"expected a list, got {_show(raw)}")
        return []
    items: list[_T] = []
    for i, item in enumerate(raw):
        try:
            items.append(convert(item))
        except _Invalid as exc:
            errs.add(f"{path}[{i}]", str(exc))
    return items


def _list_of(convert: _Scalar) -> _Custom:
    return _Custom(lambda errs, path, raw: tuple(_items(errs, path, raw, convert)))


def _methods(errs: _Errors, path: str, raw: Any) -> frozenset[str] | None:
    if raw == []:
        errs.add(path, "must not be empty (leave methods out to match every method)")
    return None if raw is None else frozenset(_items(errs, path, raw, _method)) or None


def _roles(errs: _Errors, path: str, raw: Any) -> dict[str, frozenset[str]]:
    roles: dict[str, frozenset[str]] = {}
    for name, permissions in _mapping(errs, path, {} if raw is None else raw, None).items():
        if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
            errs.add(_key(path, name), "a role name is a-z, 0-9, _ and -, from a letter")
        roles[str(name)] = frozenset(_items(errs, _key(path, name), permissions, _permission))
    return roles


def _set_headers(errs: _Errors, path: str, raw: Any) -> tuple[tuple[str, str], ...]:
    pairs: dict[str, tuple[str, str]] = {}  # normalized name → (name, value), in file order
    for name, value in _mapping(errs, path, raw, None).items():
        try:
            header, text = _header(name), _header_value(value)
        except _Invalid as exc:
            errs.add(_key(path, name), str(exc))
            continue
        if (first := pairs.get(normalize_name(header))) is not None:
            errs.add(_key(path, name), f"sets the same header as {_key(path, first[0])}")
        pairs.setdefault(normalize_name(header), (header, text))
    return tuple(pairs.values())


_ROUTE: _Schema = {
    "name": _text("a name of letters, digits, _ . and -", r"[A-Za-z0-9][A-Za-z0-9_.-]*"),
    "match": {
        "host": _optional(_host),
        "path": _optional(_text("a path like /healthz", _PATH)),
        "prefix": _optional(_text("a path like /api", _PATH, then=lambda p: p.rstrip("/") or "/")),
        "methods": _Custom(_methods),
    },
    "upstream": _upstream,
    "public": _bool,
    "require": _list_of(_permission),
    "require_any": _list_of(_permission),
    "strip_prefix": _bool,
    "timeout": _positive_duration,
    "connect_timeout": _positive_duration,
    "preserve_host": _bool,
    "websocket": _bool,
    "forward_authorization": _bool,
    "set_request_headers": _Custom(_set_headers),
    "remove_request_headers": _list_of(_header),
    "max_body": _optional(_size),
}
_NO_ROUTE = Route(name="", match=RouteMatch(), upstream="")  # the defaults; placeholder on error


def _route(errs: _Errors, path: str, raw: Any) -> Route:
    if not isinstance(raw, Mapping):
        errs.add(path, f"expected a route mapping, got {_show(raw)}")
        return _NO_ROUTE
    for key in ("name", "match", "upstream"):
        if key not in raw:
            errs.add(_key(path, key), "required")
    route = _build(errs, path, raw, _NO_ROUTE, _ROUTE)
    match, at = route.match, _key(path, "match")
    if "match" in raw and errs.clean(at) and (match.path is None) == (match.prefix is None):
        errs.add(at, "set path or prefix, not both" if match.path else "needs path or prefix")
    if route.public and (route.require or route.require_any):
        errs.add(_key(path, "public"), "public routes cannot require permissions")
    if route.strip_prefix and match.path is not None:
        errs.add(_key(path, "strip_prefix"), "only applies to match.prefix, not match.path")
    return route


def _routes(errs: _Errors, path: str, raw: Any) -> tuple[Route, ...]:
    items = _items(errs, path, [] if raw is None else raw, lambda item: item)
    routes = tuple(_route(errs, f"{path}[{i}]", item) for i, item in enumerate(items))
    first: dict[str, int] = {}
    for i, route in enumerate(routes):
        if route.name in first:
            where = f"{path}[{first[route.name]}]"
            errs.add(f"{path}[{i}].name", f'duplicate name "{route.name}" (first at {where})')
        elif route.name:
            first[route.name] = i
    return routes


_ASSERTION: _Schema = {
    "header": _header,
    "key_files": _list_of(_nonempty),
    "ttl": _positive_duration,
}


def _assertion(errs: _Errors, path: str, raw: Any) -> Assertion | None:
    if raw is None:
        return None
    built = _build(errs, path, raw, Assertion(), _ASSERTION)
    if not built.key_files and errs.clean(path):
        errs.add(f"{path}.key_files", "at least one PEM file with an EC P-256 private key")
    return built


_LISTEN: _Schema = {"host": _nonempty, "port": _int(0, 65535)}
_CONFIG: _Schema = {
    "listen": _LISTEN,
    "admin_listen": _LISTEN,
    "database": {"url": _secret, "data_dir": _nonempty, "pool": {"min": _int(0), "max": _int(1)}},
    "tokens": {
        "prefix": _text("letters and digits ending in _, like pat_", r"[A-Za-z][A-Za-z0-9]{0,15}_"),
        "default_ttl": _optional(_positive_duration),
        "max_ttl": _optional(_positive_duration),
        "allow_no_expiry": _bool,
        "max_active_per_user": _optional(_int(1)),
        "refresh_extends": _positive_duration,
        "rotation_grace": _duration,
        "revoke_on_downgrade": _bool,
        "on_excess_role": _text("strip or refuse", "strip|refuse"),
        "pepper": _list_of(_text("a non-empty string", r"(?s).+", secret=True)),
    },
    "cache": {
        "ttl": _duration,
        "negative_ttl": _duration,
        "max_entries": _int(1),
        "negative_max_entries": _int(1),
        "stale_if_error": _duration,
    },
    "usage": {"flush_interval": _positive_duration},
    "trusted_proxies": _list_of(_network),
    "identity_headers": {
        **{name: _header for name in HEADER_FIELDS},
        "assertion": _Custom(lambda errs, path, raw: _assertion(errs, path, raw)),
    },
    "management": {
        "enabled": _bool,
        "allow_pat": _bool,
        "sessions": {
            "cookie": _text("a cookie name", _TOKEN),
            "hs256_secret": _secret,
            "jwks_file": _optional(_nonempty),
            "issuer": _optional(_string),
            "audience": _optional(_string),
            "claims": {"user": _nonempty, "company": _nonempty, "role": _nonempty},
            "require_mfa_for_create": _bool,
            "mfa_values": _list_of(_nonempty),
        },
    },
    "logging": {
        "level": _text("debug, info, warning or error", "debug|info|warning|error"),
        "access_log": _bool,
    },
    "roles": _Custom(_roles),
    "routes": _Custom(_routes),
}


def _check(errs: _Errors, cfg: Config) -> None:
    """Rules that span several keys, checked only where those keys were valid themselves."""
    pool, tokens = cfg.database.pool, cfg.tokens
    if errs.clean("database.pool") and pool.min > pool.max:
        errs.add("database.pool.min", f"{pool.min} exceeds database.pool.max ({pool.max})")
    if errs.clean("tokens.default_ttl", "tokens.max_ttl", "tokens.allow_no_expiry"):
        if tokens.default_ttl is None and not tokens.allow_no_expiry:
            errs.add("tokens.default_ttl", "null (no expiry) needs tokens.allow_no_expiry: true")
        elif tokens.max_ttl is not None and (tokens.default_ttl or math.inf) > tokens.max_ttl:
            errs.add("tokens.default_ttl", f"must not exceed tokens.max_ttl ({tokens.max_ttl:g}s)")
    identity: dict[str, str] = {}
    for key, header in cfg.identity_headers.names().items():
        name = normalize_name(header)
        if name in identity:
            errs.add(f"identity_headers.{key}", f"same as identity_headers.{identity[name]}")
        identity.setdefault(name, key)
    for i, route in enumerate(cfg.routes):
        for header, _ in route.set_request_headers:
            name = normalize_name(header)
            if name in identity or is_hop_by_hop(name):
                kind = "an identity" if name in identity else "a hop-by-hop"
                errs.add(f"routes[{i}].set_request_headers.{header}", f"cannot set {kind} header")


def parse_config(data: Any, *, source: str | None = None) -> Config:
    """Validate a plain mapping (env already expanded); raise ConfigError with every error."""
    errs = _Errors()
    cfg = _build(errs, "", data, Config(), _CONFIG)
    _check(errs, cfg)
    if errs.items:
        raise ConfigError(errs.items)
    return dataclasses.replace(cfg, source=source)


# Loading ---------------------------------------------------------------------------------


def _expand_str(errs: _Errors, path: str, text: str, env: Mapping[str, str]) -> str:
    out, pos, references = [], 0, 0
    for m in _REFERENCE.finditer(text):
        out.append(text[pos : m.start()])
        pos = m.end()
        ref = _REFERENCE_BODY.fullmatch(m[1]) if m[1] is not None else None
        if m[0] == "$${":
            out.append("${")
        elif ref is None:
            errs.add(path, "malformed ${...}: use ${VAR} or ${VAR:-default} ($${ for a ${)")
        else:
            references += 1
            value = env.get(ref[1])
            if ref[2] is not None:
                value = value or ref[2]  # as in the shell: the default when unset or empty
            elif value is None:
                errs.add(path, f"environment variable {ref[1]} is not set")
            out.append(value or "")
    expanded = "".join([*out, text[pos:]])
    return _Expanded(expanded) if references else expanded


def _expand(errs: _Errors, path: str, value: Any, env: Mapping[str, str]) -> Any:
    """Expand every string scalar; a list item that is one ${...} expanding to "" is dropped."""
    if isinstance(value, str):
        return _expand_str(errs, path, value, env)
    if isinstance(value, Mapping):
        return {k: _expand(errs, _key(path, k), v, env) for k, v in value.items()}
    if isinstance(value, list):
        pairs = [(item, _expand(errs, f"{path}[{i}]", item, env)) for i, item in enumerate(value)]
        return [new for old, new in pairs if new != "" or not _SINGLE_REFERENCE.fullmatch(old)]
    return value


def load_config(path: str | Path | None = None) -> Config:
    """Read YAML from path (or $PATGATE_CONFIG, or DEFAULT_CONFIG_PATH), expand ${VAR}, validate."""
    file = Path(path if path is not None else os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError([f"{file}: cannot read: {reason}"]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{file}: line {mark.line + 1}, column {mark.column + 1}" if mark else str(file)
        raise ConfigError([f"{where}: invalid YAML: {exc.problem or exc.context}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{file}: invalid YAML: {exc}"]) from None
    errs = _Errors()
    data = _expand(errs, "", data, os.environ)
    try:
        cfg = parse_config(data, source=str(file))
    except ConfigError as exc:  # a value whose variable is missing is reported once, as missing
        failed = {item.split(": ", 1)[0] for item in errs.items}
        errs.items += [item for item in exc.errors if item.split(": ", 1)[0] not in failed]
    if errs.items:
        raise ConfigError(errs.items)
    return cfg
