import pytest

from tests.e2e.harness import GATEWAY, Harness


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "envoy_only(reason): the scenario does not apply on Kong's host (says why)")
    config.addinivalue_line(
        "markers", "kong_only(reason): the scenario does not apply on Envoy (says why)")


def pytest_collection_modifyitems(config, items):
    if GATEWAY != "kong":
        for item in items:
            marker = item.get_closest_marker("kong_only")
            if marker:
                item.add_marker(pytest.mark.skip(reason=f"Kong's host only: {marker.args[0]}"))
        return
    for item in items:
        marker = item.get_closest_marker("envoy_only")
        if marker:
            item.add_marker(pytest.mark.skip(reason=f"Envoy only: {marker.args[0]}"))
        params = getattr(item, "callspec", None)
        if params and params.params.get("driver") == "native":
            # Kong's host has one driver; the dispatch run is the Kong run.
            item.add_marker(pytest.mark.skip(reason="Kong's host runs the dispatch driver"))


@pytest.fixture
def harness(tmp_path):
    h = Harness(tmp_path)
    try:
        yield h
        # An upstream only ever sees complete attempts: a request whose body never arrived
        # whole is a failure of rollsafe's promise unless the test says it expects one.
        if not h.allow_aborted:
            aborted = [(p.name, a) for p in h.pods for a in p.aborted()]
            assert not aborted, f"pods saw aborted requests: {aborted[:5]}"
        # Every counter the test made rollsafe count was taken by the host (both hosts; on
        # Kong's host this log line is the only sign of a refused metric).
        refused = h.refused_metrics()
        assert not refused, refused[:3]
    finally:
        h.close()
