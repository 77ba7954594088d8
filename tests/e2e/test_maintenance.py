"""Maintenance windows through a real Envoy: 503 + Retry-After + problem+json inside a window,
allowlists and the operator bypass, and a stock HTTP client that waits the window out."""

import hashlib
import time
from datetime import datetime, timezone

import urllib3
from urllib3.util.retry import Retry


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


TOKEN = "let-me-in"


def maintenance_config(start: float, end: float) -> dict:
    return {"maintenance": {
        "windows": [{"start": rfc3339(start), "end": rfc3339(end)}],
        "methods": ["POST", "PUT", "PATCH", "DELETE"],
        "allow_paths": ["/healthz", "/internal/*"],
        "bypass_token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
    }}


def wait_until(ts: float) -> None:
    delay = ts - time.time()
    if delay > 0:
        time.sleep(delay)


def test_window_turns_writes_away_until_it_ends(harness):
    pod = harness.pod("a1", "a")
    start = float(int(time.time()) + 6)  # whole seconds: RFC 3339 in the config; Envoy starts first
    end = start + 3
    envoy = harness.envoy(maintenance_config(start, end), {"group-a": [pod]})

    # Before the window: writes pass.
    assert time.time() < start, "Envoy took too long to start for this test"
    assert envoy.request("POST", "/orders", "{}").status == 201

    wait_until(start + 0.05)
    r = envoy.request("POST", "/orders?id=7", '{"sku": 1}')
    assert r.status == 503, r
    retry_after = int(r.headers["retry-after"])
    assert 1 <= retry_after <= 3
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["status"] == 503
    assert problem["type"] == "urn:problem-type:rollsafe:maintenance"
    assert problem["maintenance_until"] == rfc3339(end)
    assert problem["instance"] == "/orders"

    # Allowlisted path and a read-only method pass; the bypass token passes; a wrong one doesn't.
    assert envoy.request("POST", "/healthz").status == 201
    assert envoy.request("POST", "/internal/flush").status == 201
    assert envoy.request("GET", "/orders").status == 200
    assert envoy.request("POST", "/orders", "{}", {"x-maintenance-bypass": TOKEN}).status == 201
    assert envoy.request("POST", "/orders", "{}", {"x-maintenance-bypass": "guess"}).status == 503

    # Turned-away requests never reached the pod: only the passed ones are in its ledger.
    paths = [w["path"] for w in pod.ledger()]
    assert paths == ["/orders", "/healthz", "/internal/flush", "/orders"]

    # A stock client honouring Retry-After gets its 2xx once the window is over, no extra code.
    http = urllib3.PoolManager(retries=Retry(total=5, status_forcelist=[503],
                                             respect_retry_after_header=True,
                                             allowed_methods=None, backoff_factor=0))
    r = http.request("POST", f"http://127.0.0.1:{envoy.port}/orders", body=b'{"sku": 2}',
                     headers={"content-type": "application/json"})
    assert r.status == 201
    assert time.time() >= end
    assert [w["body"] for w in pod.ledger()][-1] == '{"sku": 2}'

    if envoy.has_stats:
        stats = envoy.stats()
        assert stats.get("wasmcustom.rollsafe_maintenance_rejected", 0) >= 3, stats
        assert stats.get("wasmcustom.rollsafe_maintenance_bypassed", 0) == 1, stats


def test_recurring_daily_window_sends_seconds_to_its_end(harness):
    pod = harness.pod("a1", "a")
    now = time.time()
    minute_start = now - now % 60
    hhmm = datetime.fromtimestamp(minute_start, timezone.utc).strftime("%H:%M")
    config = {"maintenance": {"windows": [
        {"rrule": "FREQ=DAILY", "start_time": hhmm, "duration_s": 180}]}}
    envoy = harness.envoy(config, {"group-a": [pod]})
    r = envoy.request("GET", "/anything")
    assert r.status == 503
    expected = minute_start + 180 - time.time()
    assert abs(int(r.headers["retry-after"]) - expected) <= 2, (r.headers, expected)
    assert pod.attempts() == []


def test_http_date_retry_after(harness):
    pod = harness.pod("a1", "a")
    now = int(time.time())
    config = {"maintenance": {"windows": [{"start": rfc3339(now - 10), "end": rfc3339(now + 60)}],
                              "retry_after": "http-date"}}
    envoy = harness.envoy(config, {"group-a": [pod]})
    r = envoy.request("DELETE", "/orders/1")
    assert r.status == 503
    from email.utils import parsedate_to_datetime
    assert parsedate_to_datetime(r.headers["retry-after"]).timestamp() == now + 60


def parse_notice(value: str) -> dict:
    """A client's reading of `Maintenance-Notice` (an RFC 8941 dictionary): start and end as
    HTTP-dates, and the methods turned away (`*`: all)."""
    from email.utils import parsedate_to_datetime
    import re
    fields = dict(re.findall(r'(\w+)=("[^"]*"|\([^)]*\)|\*)', value))
    methods = fields["methods"]
    return {
        "start": parsedate_to_datetime(fields["start"].strip('"')).timestamp(),
        "end": parsedate_to_datetime(fields["end"].strip('"')).timestamp(),
        "methods": None if methods == "*" else re.findall(r'"([A-Z]+)"', methods),
    }


def test_clients_are_told_of_a_window_before_it_opens_and_can_read_the_schedule(harness):
    """`notice_s` before a window opens every response carries `Maintenance-Notice` (start, end,
    methods); then the window's 503s; after it, neither. The schedule path lists the window and
    answers during it too. Reads, writes and rollsafe-owned keyed writes all carry the notice."""
    pod = harness.pod("a1", "a")
    start = float(int(time.time()) + 6)
    end = start + 3
    cfg = maintenance_config(start, end)
    cfg["maintenance"].update({"notice_s": 60, "schedule_path": "/.well-known/maintenance"})
    cfg["idempotency"] = {}
    gw = harness.envoy(cfg, {"group-a": [pod]})

    def schedule():
        r = gw.request("GET", "/.well-known/maintenance")
        assert r.status == 200, r
        assert r.headers["content-type"] == "application/json"
        assert r.headers["cache-control"].startswith("public, max-age=")
        return r.json()

    doc = schedule()
    assert doc["windows"][0] == {"start": rfc3339(start), "end": rfc3339(end), "active": False}
    assert doc["methods"] == ["POST", "PUT", "PATCH", "DELETE"]
    assert len(pod.attempts()) == 0, "answered by rollsafe itself"
    # Before the window, within the notice period: every answer announces it.
    for r in (gw.request("GET", "/orders/1"),
              gw.request("POST", "/orders", '{"sku": 1}', {"content-type": "application/json"}),
              gw.request("POST", "/orders", '{"sku": 2}', {"content-type": "application/json",
                                                         "idempotency-key": '"notice-1"'})):
        assert r.status in (200, 201), r
        notice = parse_notice(r.headers["maintenance-notice"])
        assert notice == {"start": start, "end": end,
                          "methods": ["POST", "PUT", "PATCH", "DELETE"]}, r.headers
    wait_until(start + 0.3)
    r = gw.request("POST", "/orders", '{"sku": 3}', {"content-type": "application/json"})
    assert r.status == 503
    during = schedule()
    assert during["windows"][0]["active"] is True, "the schedule answers during the window"
    wait_until(end + 0.3)
    r = gw.request("POST", "/orders", '{"sku": 4}', {"content-type": "application/json"})
    assert r.status == 201
    assert "maintenance-notice" not in r.headers
    assert schedule()["windows"] == []
