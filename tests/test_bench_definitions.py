"""The bench's variants, checked without running a proxy: every ratio `make bench` reports
compares instruction counts of the same kind of request."""

import dataclasses

import pytest

from tests.e2e import bench


class _Pod:
    address = "127.0.0.1:1"


def _all_variants() -> list:
    clusters = {"bench": [_Pod()]}
    out = bench.variants(clusters)
    names = {v.name for v in out}
    # Kong's host's variants are listed only when KONG_WASM_NGINX is set: check them anyway.
    return out + [v for v in bench.kong_variants(clusters, None, None) if v.name not in names]


def test_each_variant_counts_the_request_it_is_compared_with():
    bench.check_counted(_all_variants())


def test_a_floor_counting_another_request_is_refused():
    out = [dataclasses.replace(v, fixed=("GET", "/bench", {}, None))
           if v.name == "kong_replay_floor_1k" else v for v in _all_variants()]
    with pytest.raises(ValueError, match="kong_replay_floor_1k"):
        bench.check_counted(out)
