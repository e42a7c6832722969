"""``vigil.yaml``: tenants and their policies, validated once at start with errors that name
the offending path (``redaction.strict.actions.emial: unknown type``).

A section or setting Vigil does not know is an error, as is a value of the wrong shape, so a
typo never goes unnoticed (nor leaves a rule at its default).
Secrets (pseudonym keys) come from environment variables the file names, never from the file.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regex

from pipeline.alerting import Route, parse_routes
from pipeline.alerts import AlertRules, parse_rules
from pipeline.detectors import (
    DETECTORS,
    PII_TYPES,
    SECRET_TYPES,
    Detector,
    backtracks,
    custom_detector,
    prefilter_refuses,
)
from pipeline.enrich import AgentInfo
from pipeline.ledger import Retention
from pipeline.prices import DEFAULT_CATALOG, Catalog
from pipeline.ratelimit import RateLimit, parse_rate_limit
from pipeline.redact import ACTIONS, DEFAULT_POLICY, ID_FIELDS, Policy, scrub_policy
from pipeline.settings import ConfigError, list_of, load_yaml, mapping_of, read_input

KNOWN_SECTIONS = frozenset(
    {
        "tenants",
        "redaction",
        "agents",
        "budgets",
        "drift",
        "evals",
        "prices",
        "alerts",
        "legal_hold",
    }
)
_TYPES = frozenset(d.type for d in DETECTORS)
_GROUPS = {"pii": PII_TYPES, "secrets": SECRET_TYPES}
DEFAULT_KEY_ENV = "VIGIL_PSEUDONYM_KEY"


@dataclass(frozen=True)
class Config:
    policies: Mapping[str, Policy] = field(default_factory=lambda: {"default": DEFAULT_POLICY})
    tenant_policy: Mapping[str, str] = field(default_factory=dict)
    agents: Mapping[str, AgentInfo] = field(default_factory=dict)
    catalog: Catalog = field(default_factory=Catalog.load, repr=False)
    retention: Retention = field(default_factory=Retention)
    # gateway keys: sha256(key) hex -> tenant; the keys themselves are never kept
    api_keys: Mapping[str, str] = field(default_factory=dict, repr=False)
    # tenant -> the variable its api_keys_env names, where that holds no key
    keys_unset: Mapping[str, str] = field(default_factory=dict)
    disabled_tenants: frozenset[str] = frozenset()
    # events a second each tenant may send through the gateway (``pipeline.ratelimit``)
    rate_limits: Mapping[str, RateLimit] = field(default_factory=dict)
    rules: AlertRules = field(default_factory=AlertRules)
    routes: tuple[Route, ...] = field(default=(), repr=False)  # webhook URLs are secrets
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def policy_for(self, tenant: str) -> Policy:
        """The tenant's redaction policy; tenants not listed get ``default``."""
        return self.policies[self.tenant_policy.get(tenant, "default")]

    @functools.cached_property
    def scrub(self) -> Policy:
        """What dead letters are scrubbed with: the built-in detectors and every tenant's
        custom patterns (``redact.scrub_policy``)."""
        return scrub_policy(self.policies.values())

    def compile_patterns(self) -> None:
        """Compile every policy's prefilter and the dead letters' (``scrub``) now: a worker or a
        gateway does at start. Compiled at first use, the built-in detectors' (about 0.3 s)
        held the worker's event loop at its first event, or a gateway's first rejected
        request."""
        for policy in (*self.policies.values(), self.scrub):
            policy.prefilter  # noqa: B018 (a cached property: read to be compiled)

    def slow_patterns(self) -> list[str]:
        """The custom redaction patterns that may backtrack for a very long time
        (``detectors.backtracks``), by where vigil.yaml has them: on a text of a few dozen
        characters one could run for hours, where the worker stops it and sends the event to
        the DLQ (``detectors.CUSTOM_PATTERN_SECONDS``)."""
        return [
            f"redaction.{name}.custom[{i}] ({detector.type}: {detector.pattern.pattern!r})"
            for name, policy in self.policies.items()
            for i, detector in enumerate(policy.custom)
            if backtracks(detector.pattern.pattern)
        ]


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _policy(name: str, spec: Mapping[str, Any], env: Mapping[str, str]) -> Policy:
    where = f"redaction.{name}"
    mapping_of(spec, ("default_action", "actions", "scan_ids", "custom", "key_env"), where)
    custom: list[Detector] = []
    for i, item in enumerate(list_of(spec.get("custom"), f"{where}.custom")):
        item = _mapping(item, f"{where}.custom[{i}]")
        if not re.fullmatch(r"[a-z][a-z0-9_]{1,40}", str(item.get("name", ""))):
            raise ConfigError(f"{where}.custom[{i}].name: expected a lower_snake_case name")
        try:
            text = str(item["pattern"])
            text.encode("utf-8")  # the prefilter scans UTF-8: "\uD800" in YAML is not
            detector = custom_detector(item["name"], text)
        except (KeyError, re.error, regex.error, UnicodeEncodeError) as exc:
            raise ConfigError(
                f"{where}.custom[{i}].pattern: not a valid regular expression ({exc})"
            ) from None
        custom.append(detector)
    if custom and (refused := prefilter_refuses(custom)) is not None:
        index, why = refused
        raise ConfigError(f"{where}.custom{'' if index is None else f'[{index}].pattern'}: {why}")
    known = _TYPES | {d.type for d in custom}
    actions: dict[str, str] = {}
    for kind, action in _mapping(spec.get("actions"), f"{where}.actions").items():
        if action not in ACTIONS:
            raise ConfigError(
                f"{where}.actions.{kind}: {action!r} is not one of {', '.join(ACTIONS)}"
            )
        if kind in _GROUPS:
            actions.update(dict.fromkeys(_GROUPS[kind], action))
        elif kind in known:
            actions[kind] = action
        else:
            raise ConfigError(
                f"{where}.actions.{kind}: unknown type (known: {', '.join(sorted(known))})"
            )
    default_action = spec.get("default_action", "mask")
    if default_action not in ACTIONS:
        raise ConfigError(
            f"{where}.default_action: {default_action!r} is not one of {', '.join(ACTIONS)}"
        )
    fields = list_of(spec.get("scan_ids"), f"{where}.scan_ids")
    if any(not isinstance(field, str) for field in fields):  # a list in it was a TypeError
        raise ConfigError(f"{where}.scan_ids: expected a list of field names")
    scan_ids = frozenset(fields)
    if scan_ids - set(ID_FIELDS):
        raise ConfigError(
            f"{where}.scan_ids: {sorted(scan_ids - set(ID_FIELDS))[0]} is not one of "
            + ", ".join(ID_FIELDS)
        )
    key = None
    if "pseudonymize" in (*actions.values(), default_action):
        key_env = str(spec.get("key_env", DEFAULT_KEY_ENV))
        secret = env.get(key_env)
        if not secret or len(secret) < 16:
            raise ConfigError(
                f"{where}: pseudonymize needs a key of at least 16 characters in the environment "
                f"variable {key_env} (keys never live in vigil.yaml)"
            )
        key = secret.encode()
    return Policy(name, actions, default_action, scan_ids, tuple(custom), key)


def parse_config(data: Any, env: Mapping[str, str], source: str = "vigil.yaml") -> Config:
    """Validate a loaded vigil.yaml. Raises ConfigError naming the offending path."""
    top = _mapping(data, source)
    unknown = set(top) - KNOWN_SECTIONS
    if unknown:
        raise ConfigError(
            f"{source}: unknown section {sorted(unknown)[0]!r} "
            f"(known: {', '.join(sorted(KNOWN_SECTIONS))})"
        )
    folder = Path(source).resolve().parent  # where the paths it gives are relative to
    policies = {"default": DEFAULT_POLICY}
    for name, spec in _mapping(top.get("redaction"), "redaction").items():
        policies[name] = _policy(name, _mapping(spec, f"redaction.{name}"), env)
    tenant_policy: dict[str, str] = {}
    retention_days: dict[str, int] = {}
    api_keys: dict[str, str] = {}
    keys_unset: dict[str, str] = {}
    disabled: set[str] = set()
    rate_limits: dict[str, RateLimit] = {}
    for tenant, spec in _mapping(top.get("tenants"), "tenants").items():
        spec = _mapping(spec, f"tenants.{tenant}")
        mapping_of(spec, ("redaction", "retention_days", "api_keys_env", "api_keys_file",
                          "api_key_sha256", "disabled", "rate_limit"),
                   f"tenants.{tenant}")  # fmt: skip
        if "retention_days" in spec:
            days = spec["retention_days"]
            if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= 36500:
                raise ConfigError(
                    f"tenants.{tenant}.retention_days: expected whole days from 1 to 36500, "
                    f"got {days!r}"
                )
            retention_days[str(tenant)] = days
        if (unset := _api_keys(str(tenant), spec, env, api_keys, folder)) is not None:
            keys_unset[str(tenant)] = unset
        if "rate_limit" in spec:
            rate_limits[str(tenant)] = parse_rate_limit(
                spec["rate_limit"], f"tenants.{tenant}.rate_limit"
            )
        if spec.get("disabled", False) is True:
            disabled.add(str(tenant))
        elif spec.get("disabled", False) is not False:
            raise ConfigError(f"tenants.{tenant}.disabled: expected true or false")
        chosen = str(spec.get("redaction", "default"))
        if chosen not in policies:
            raise ConfigError(
                f"tenants.{tenant}.redaction: no policy named {chosen!r} under redaction"
            )
        tenant_policy[tenant] = chosen
    agents: dict[str, AgentInfo] = {}
    for key, spec in _mapping(top.get("agents"), "agents").items():
        if not re.fullmatch(r"[^/\s]+/[^/\s]+", str(key)):
            raise ConfigError(f"agents.{key}: expected tenant/agent")
        spec = _mapping(spec, f"agents.{key}")
        mapping_of(spec, ("owner", "team", "unit"), f"agents.{key}")
        agents[str(key)] = AgentInfo(**{k: str(v) for k, v in spec.items()})
    retention = Retention(retention_days, *_legal_hold(top.get("legal_hold")))
    catalog = _catalog(top.get("prices"), source)
    return Config(
        policies=policies,
        tenant_policy=tenant_policy,
        agents=agents,
        catalog=catalog,
        retention=retention,
        api_keys=api_keys,
        keys_unset=keys_unset,
        disabled_tenants=frozenset(disabled),
        rate_limits=rate_limits,
        rules=parse_rules(top),
        routes=tuple(parse_routes(top)),
        raw=top,
    )


def key_digest(key: str) -> str:
    """The SHA-256 of an API key's bytes. A header's bytes that are not UTF-8 reach here as
    lone surrogates (aiohttp, like os.environ, decodes with surrogateescape): encoded back the
    same way, not a UnicodeEncodeError and a 500 where a 401 belongs."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def _api_keys(
    tenant: str,
    spec: Mapping[str, Any],
    env: Mapping[str, str],
    into: dict[str, str],
    folder: Path,
) -> str | None:
    """``api_keys_env: VAR`` (comma-separated keys in the environment), ``api_keys_file: PATH``
    (one key a line, a path relative to ``folder``, vigil.yaml's) and ``api_key_sha256: [hex,
    ...]``; a key may belong to one tenant only. Returns the variable ``api_keys_env`` names
    when it holds no key."""
    where = f"tenants.{tenant}"
    digests = []
    unset = None
    if "api_keys_env" in spec:
        name = spec["api_keys_env"]
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(
                f"{where}.api_keys_env: expected the name of an environment variable, got {name!r}"
            )
        from_env = [key_digest(k.strip()) for k in env.get(name, "").split(",") if k.strip()]
        unset = None if from_env else name
        digests += from_env
    if "api_keys_file" in spec:
        digests += _keys_in_file(spec["api_keys_file"], f"{where}.api_keys_file", folder)
    for i, digest in enumerate(list_of(spec.get("api_key_sha256"), f"{where}.api_key_sha256")):
        if not re.fullmatch(r"[0-9a-f]{64}", str(digest)):
            raise ConfigError(f"{where}.api_key_sha256[{i}]: expected 64 lowercase hex digits")
        digests.append(str(digest))
    for digest in digests:
        if into.get(digest, tenant) != tenant:
            raise ConfigError(f"{where}: an API key is also a key of tenant {into[digest]!r}")
        into[digest] = tenant
    return unset


def _keys_in_file(value: Any, where: str, folder: Path) -> list[str]:
    """The digests of the keys in file ``value``, one a line (blank lines and lines starting
    with # skipped): a mounted secret, read as vigil.yaml is (the gateway's start, each SIGHUP).
    Raises ConfigError naming the file, never a key, when it cannot be read."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected the path of a file of keys, got {value!r}")
    path = Path(value).expanduser()
    path = path if path.is_absolute() else folder / path
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
    lines = (line.strip() for line in text.splitlines())
    return [key_digest(line) for line in lines if line and not line.startswith("#")]


def _legal_hold(spec: Any) -> tuple[frozenset[str], frozenset[tuple[str, str, str]]]:
    """``legal_hold: {tenants: [acme], units: ["globex/claim:C-1001"]}``."""
    spec = _mapping(spec, "legal_hold")
    mapping_of(spec, ("tenants", "units"), "legal_hold")
    tenants = frozenset(str(t) for t in list_of(spec.get("tenants"), "legal_hold.tenants"))
    units = set()
    for i, unit in enumerate(list_of(spec.get("units"), "legal_hold.units")):
        found = re.fullmatch(r"([^/\s]+)/([^:\s]+):(\S+)", str(unit))
        if found is None:
            raise ConfigError(
                f"legal_hold.units[{i}]: expected tenant/unit_type:unit_id, got {unit!r}"
            )
        units.add((found[1], found[2], found[3]))
    return tenants, frozenset(units)


def _catalog(spec: Any, source: str) -> Catalog:
    """``prices: FILE`` or ``prices: {catalog: FILE, aliases: {deployment: model}}``."""
    if spec is None:
        return Catalog.load()
    if isinstance(spec, str):
        spec = {"catalog": spec}
    spec = _mapping(spec, "prices")
    mapping_of(spec, ("catalog", "aliases"), "prices")
    path = Path(spec["catalog"]) if spec.get("catalog") else DEFAULT_CATALOG
    if not path.is_absolute():
        path = Path(source).resolve().parent / path
    aliases = {str(k): str(v) for k, v in _mapping(spec.get("aliases"), "prices.aliases").items()}
    return Catalog.load(path, aliases)


def load_config(path: Path | None, env: Mapping[str, str]) -> Config:
    """Read and validate ``path``; None gives the built-in defaults (mask everything found)."""
    if path is None:
        return Config()
    what = "configuration file"
    return parse_config(load_yaml(read_input(path, what), path, what), env, str(path))
