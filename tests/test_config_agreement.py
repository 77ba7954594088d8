"""Kong's meta.json, the Rust config parser and every example config agree.

Every valid example (tests/configs/valid.json, the filter configs in kong/kong.yml, the demo
config) must pass both the JSON Schema Kong validates with and the Rust parser; every
counter-example (tests/configs/invalid.json) must be refused by both, and Rust must name the
field the counter-example breaks.
"""

import json
import os
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "target" / "release" / "examples" / "check_config"
META = json.loads((ROOT / "kong" / "rollsafe.meta.json").read_text())
SCHEMA = META["config_schema"]
VALIDATOR = jsonschema.Draft4Validator(SCHEMA)


def rust_check(configs: list, host: str = "envoy") -> list[dict]:
    """Runs the Rust parser (the same code on_configure runs) over each config, as `host`."""
    assert CHECK.exists(), "build it: cargo build --release --example check_config"
    texts = [c if isinstance(c, str) else json.dumps(c) for c in configs]
    out = subprocess.run([str(CHECK), "--lines"], input="".join(json.dumps(t) + "\n" for t in texts),
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "ROLLSAFE_HOST": host}).stdout
    return [json.loads(line) for line in out.splitlines()]


def kong_filter_configs() -> list:
    doc = yaml.safe_load((ROOT / "kong" / "kong.yml").read_text())
    found = []
    for service in doc.get("services", []):
        for holder in [service] + service.get("routes", []):
            for chain in holder.get("filter_chains", []):
                for f in chain["filters"]:
                    if f["name"] == "rollsafe":
                        found.append(f.get("config", {}))
    return found


def valid_configs() -> list:
    configs = json.loads((ROOT / "tests" / "configs" / "valid.json").read_text())
    configs += kong_filter_configs()
    configs.append(json.loads((ROOT / "tests" / "e2e" / "demo.json").read_text()))
    return configs


def test_meta_json_is_a_draft4_schema():
    jsonschema.Draft4Validator.check_schema(SCHEMA)
    assert META["config_schema"]["$schema"] == "http://json-schema.org/draft-04/schema#"


def test_every_example_passes_schema_and_rust():
    configs = valid_configs()
    assert len(configs) >= 3
    results = rust_check(configs)
    for config, result in zip(configs, results):
        if isinstance(config, str):  # empty config: Kong sends no JSON; nothing to validate
            assert config.strip() == "" or VALIDATOR.is_valid(json.loads(config))
        else:
            errors = [e.message for e in VALIDATOR.iter_errors(config)]
            assert not errors, (config, errors)
        assert result["ok"], (config, result)


INVALID = json.loads((ROOT / "tests" / "configs" / "invalid.json").read_text())


@pytest.mark.parametrize("case", INVALID, ids=[c["name"] for c in INVALID])
def test_every_counter_example_is_refused_by_both(case):
    assert not VALIDATOR.is_valid(case["config"]), f"schema accepts {case['name']}"
    [result] = rust_check([case["config"]])
    assert not result["ok"], f"Rust accepts {case['name']}"
    assert result["path"] == case["field"], result


def test_kong_examples_configure_on_kongs_host():
    configs = kong_filter_configs()
    for config, result in zip(configs, rust_check(configs, host="kong")):
        assert result["ok"], (config, result)
    # And what only Kong refuses is refused there.
    [native] = rust_check([{"retry": {"target": "svc:80", "exchange": "native"}}], host="kong")
    assert native["path"] == "retry.exchange"
    # No retry.target: attempts go to the route's Service (kong.router.service, Kong 3.6+).
    [no_target] = rust_check([{"retry": {}}], host="kong")
    assert no_target["ok"], no_target


def test_kong_yml_passes_decks_schema():
    # Vendored copy of decK's schema (provenance: tests/fixtures/README.md).
    deck = json.loads((ROOT / "tests" / "fixtures" / "deck_kong_json_schema.json").read_text())
    doc = yaml.safe_load((ROOT / "kong" / "kong.yml").read_text())
    errors = [f"{list(e.path)}: {e.message}" for e in jsonschema.Draft4Validator(deck).iter_errors(doc)]
    assert not errors, errors
    assert doc["_format_version"] == "3.0"


def route_plugins(doc) -> dict:
    """Route name -> its rollsafe plugin entries (Kong 3.9's form)."""
    return {r["name"]: [p for p in r.get("plugins", []) if p["name"] == "rollsafe"]
            for s in doc["services"] for r in s.get("routes", [])}


def test_kong_39_plugin_form_passes_decks_schema_and_matches_the_filter_chains():
    """Kong 3.9 / Enterprise 3.10 configure the filter per route through /plugins: the same
    routes and configuration objects as the filter_chains form, and no `consumer` (Kong refuses
    one on a Wasm filter's plugin)."""
    deck = json.loads((ROOT / "tests" / "fixtures" / "deck_kong_json_schema.json").read_text())
    doc = yaml.safe_load((ROOT / "kong" / "kong-3.9.yml").read_text())
    errors = [f"{list(e.path)}: {e.message}" for e in jsonschema.Draft4Validator(deck).iter_errors(doc)]
    assert not errors, errors
    chains = yaml.safe_load((ROOT / "kong" / "kong.yml").read_text())
    filters = {r["name"]: [f for c in r.get("filter_chains", []) for f in c["filters"]]
               for s in chains["services"] for r in s.get("routes", [])}
    plugins = route_plugins(doc)
    assert plugins.keys() == filters.keys()
    for route, entries in plugins.items():
        assert [(p.get("enabled", True), p.get("config")) for p in entries] == \
               [(f.get("enabled", True), f.get("config")) for f in filters[route]], route
        assert all("consumer" not in p and "filter_chains" not in p for p in entries)
    assert any(plugins.values())
    meta = json.loads((ROOT / "kong" / "rollsafe.meta.json").read_text())["config_schema"]
    for entries in plugins.values():
        for p in entries:
            jsonschema.Draft4Validator(meta).validate(p["config"])


def test_kong_yml_enables_rollsafe_per_route():
    doc = yaml.safe_load((ROOT / "kong" / "kong.yml").read_text())
    routes = [r for s in doc["services"] for r in s.get("routes", [])]
    chains = {r["name"]: r["filter_chains"] for r in routes if r.get("filter_chains")}
    assert len(chains) >= 2
    states = {f["enabled"] for c in chains.values() for chain in c for f in chain["filters"]}
    assert states == {True, False}, "one route must carry rollsafe disabled"
    assert len({json.dumps(c, sort_keys=True) for c in chains.values()}) == len(chains)


def test_kong_conf_sets_what_rollsafe_needs():
    conf = (ROOT / "kong" / "kong.conf").read_text()
    settings = {}
    for line in conf.splitlines():
        line = line.split("#", 1)[0].strip()
        if "=" in line:
            k, v = (p.strip() for p in line.split("=", 1))
            settings[k] = v
    assert settings["wasm"] == "on"
    assert settings["wasm_filters_path"]
    assert "nginx_wasm_shm_kv_rollsafe" in settings
    size = settings["nginx_http_client_body_buffer_size"]
    assert size.endswith("m") and int(size[:-1]) >= 1


def test_rules_across_fields_are_refused_by_rust_with_the_field_named():
    """JSON Schema cannot compare two fields; on_configure does, and names the field."""
    [lease] = rust_check([{"retry": {"attempts": 2, "per_try_timeout_ms": 4000},
                           "idempotency": {"lease_ms": 5000}}])
    assert not lease["ok"] and lease["path"] == "idempotency.lease_ms", lease
    # Keys on writes: their attempts wait for an answer up to the deadline (15 s by default).
    assert "15000 ms" in json.dumps(lease), lease
    # Keys on idempotent methods only: 2 attempts of 4 s and, between them, the longest
    # upstream Retry-After waited (5 s).
    [reads] = rust_check([{"retry": {"attempts": 2, "per_try_timeout_ms": 4000},
                           "idempotency": {"lease_ms": 5000, "methods": ["PUT"]}}])
    assert not reads["ok"] and "13000 ms" in json.dumps(reads), reads


FAMILY = [
    # (manifest, CRD schema vendored in tests/fixtures, where rollsafe's config is)
    ("deploy/istio/wasmplugin.yaml", "istio_wasmplugin_v1alpha1_schema.json",
     lambda doc: doc["spec"]["pluginConfig"]),
    ("deploy/envoy-gateway/envoyextensionpolicy.yaml",
     "envoy_gateway_envoyextensionpolicy_v1alpha1_schema.json",
     lambda doc: doc["spec"]["wasm"][0]["config"]),
]


@pytest.mark.parametrize("manifest,schema,config_of", FAMILY, ids=["istio", "envoy-gateway"])
def test_envoy_family_manifests_pass_their_crd_schema_and_rollsafe(manifest, schema, config_of):
    """The Istio WasmPlugin and the Envoy Gateway EnvoyExtensionPolicy: each passes its
    project's CRD schema (vendored, provenance in tests/fixtures/README.md), and the config it
    carries passes rollsafe's schema and on_configure on Envoy."""
    crd = json.loads((ROOT / "tests" / "fixtures" / schema).read_text())
    doc = yaml.safe_load((ROOT / manifest).read_text())
    validator = jsonschema.Draft7Validator(crd)
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, errors
    # The schema does check: a wrong enum value is refused.
    broken = json.loads(json.dumps(doc))
    if "pluginConfig" in broken["spec"]:
        broken["spec"]["phase"] = "BEFORE_EVERYTHING"
    else:
        broken["spec"]["wasm"][0]["code"]["type"] = "FTP"
    assert list(validator.iter_errors(broken)), "the vendored schema refuses a wrong value"
    cfg = config_of(doc)
    meta = json.loads((ROOT / "kong" / "rollsafe.meta.json").read_text())["config_schema"]
    jsonschema.Draft4Validator(meta).validate(cfg)
    [result] = rust_check([cfg])
    assert result["ok"], result
