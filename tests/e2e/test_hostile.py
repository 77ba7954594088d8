"""Hostile input through the real gateway (Envoy, or Kong's host under ROLLSAFE_GATEWAY=kong):
every request gets a clear 4xx or its documented behaviour, nothing half-formed reaches a pod,
the gateway's memory stays bounded and nothing traps."""

import socket
import time

import pytest

from tests.e2e.harness import GATEWAY, rss_kib, wrk_until

KEYED = {"retry": {"backoff": {"base_ms": 10, "max_ms": 20}}, "idempotency": {}}


def raw(gw, head: bytes, body: bytes = b"", timeout: float = 10) -> tuple[int, dict, bytes]:
    """Sends the request bytes exactly as given (header bytes no HTTP library would send) and
    reads the answer: (status, lower-cased headers, body)."""
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=timeout)
    try:
        s.sendall(head + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        top, _, rest = data.partition(b"\r\n\r\n")
        lines = top.split(b"\r\n")
        status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else 0
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower().decode("latin-1")] = v.strip().decode("latin-1")
        length = int(headers.get("content-length", "0") or 0)
        while len(rest) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
        return status, headers, rest
    finally:
        s.close()


def keyed_post(key_lines: list[bytes], body: bytes = b"{}", path: bytes = b"/orders") -> bytes:
    head = (b"POST " + path + b" HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer alice\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n")
    for line in key_lines:
        head += b"Idempotency-Key: " + line + b"\r\n"
    return head


def assert_healthy(gw) -> None:
    """Nothing trapped, no worker died, and the gateway still answers a normal keyed write."""
    assert_no_trap(gw)
    r = gw.request("POST", "/orders", "{}", {"idempotency-key": f'"ok-{time.monotonic_ns()}"',
                                             "content-type": "application/json"})
    assert r.status == 201, r


BAD_KEYS = {
    "over 255 characters": [b'"' + b"k" * 300 + b'"'],
    "non-ASCII (UTF-8)": ['"ключ"'.encode()],
    "bytes that are not UTF-8": [b'"\xff\xfekey"'],
    "a control character": [b'"a\x01b"'],
    "repeated": [b'"one"', b'"two"'],
}


@pytest.mark.parametrize("case", list(BAD_KEYS))
def test_a_bad_idempotency_key_gets_400_and_reaches_no_pod(harness, case):
    pod = harness.pod("a1", "a")
    gw = harness.envoy(KEYED, {"group-a": [pod]})
    status, headers, body = raw(gw, keyed_post(BAD_KEYS[case]), b"{}")
    assert status == 400, (status, headers, body)
    if case != "a control character" or "problem" in headers.get("content-type", ""):
        # rollsafe's own answer: a problem document naming the header. (Envoy refuses a
        # control character in a header value itself, before any filter runs.)
        assert headers["content-type"] == "application/problem+json", headers
        assert b"idempotency-key-invalid" in body, body
    time.sleep(0.2)
    assert pod.attempts() == []
    assert_healthy(gw)


def test_bad_keys_over_and_over_keep_memory_bounded(harness):
    pod = harness.pod("a1", "a")
    gw = harness.envoy(KEYED, {"group-a": [pod]})
    cases = list(BAD_KEYS.values())

    def burst(n):
        for i in range(n):
            status, _, _ = raw(gw, keyed_post(cases[i % len(cases)]), b"{}")
            assert status == 400

    burst(300)
    before = rss_kib(gw.proc.pid)
    burst(1500)
    after = rss_kib(gw.proc.pid)
    assert after - before < 8 * 1024, f"private memory grew {before} -> {after} KiB"
    assert pod.attempts() == []
    assert_healthy(gw)


def test_a_100_kb_header_is_refused_by_the_gateway_and_nothing_breaks(harness):
    pod = harness.pod("a1", "a")
    gw = harness.envoy(KEYED, {"group-a": [pod]})
    head = keyed_post([b'"big"']) + b"X-Big: " + b"a" * 100_000 + b"\r\n"
    try:
        status, _, _ = raw(gw, head, b"{}")
    except (ConnectionResetError, BrokenPipeError):
        status = 0  # refused mid-send: as clear as a status for a client sending 100 KB
    assert status in (0, 400, 431, 494), status
    time.sleep(0.2)
    assert pod.attempts() == []
    assert_healthy(gw)


def test_a_body_over_the_hosts_buffer_is_refused_whole_never_cut(harness):
    """Kong's host hands the filter nothing of a body nginx spilled to a file (over
    client_body_buffer_size); on Envoy, whose buffer holds 1 MiB of a held body, a larger
    max_body_bytes is refused at configure time, so a body over it is refused by its declared
    length before the route's upstream is contacted. Either way: 413, no pod sees any of it."""
    pod = harness.pod("a1", "a")
    if harness_kind(harness) == "kong":
        cfg = {"retry": {"max_body_bytes": 8 * 1024 * 1024, "body_too_large": "reject"},
               "idempotency": {}}
        gw = harness.envoy(cfg, {"group-a": [pod]}, body_buffer="8k")
        size = 20_000
    else:
        cfg = {**KEYED, "retry": {**KEYED["retry"], "body_too_large": "reject"}}
        gw = harness.envoy(cfg, {"group-a": [pod]})
        size = 2 * 1024 * 1024
    body = b"x" * size
    for _ in range(2):
        # Refused again the second time, not told it is in flight: nothing ran, so the key
        # was released.
        status, headers, text = raw(gw, keyed_post([b'"large"'], body), body, timeout=30)
        assert status == 413, (status, headers, text[:300])
        assert headers["content-type"] == "application/problem+json"
    time.sleep(0.3)
    assert pod.attempts() == []
    assert_healthy(gw)


@pytest.mark.xfail(GATEWAY == "kong",
                   reason="Kong's host gives no body callback for an empty chunked body",
                   strict=True)
def test_an_empty_chunked_keyed_write_runs_once_and_is_replayed(harness):
    """A chunked body of no bytes (a cancel, a confirmation: a write whose key is all there is
    to it) is a whole request: it runs once, and a re-send is replayed.

    Not on Kong's host, which never calls the filter's body callback for a body it holds no
    buffer of (ngx_wasm_module 9136e463, ngx_http_proxy_wasm_on_request_body_handler): rollsafe
    never sees that body whole, `proxy_pass` carries the request, and its key is not applied
    (README, "What differs on Kong's host"). Marked to fail there, strictly: it reports when
    the host starts calling it."""
    pod = harness.pod("a1", "a")
    cfg = {**KEYED, "retry": {**KEYED["retry"], "body_too_large": "reject"}}
    gw = harness.envoy(cfg, {"group-a": [pod]})
    head = (b"POST /orders/7/cancel HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer alice\r\n"
            b"Connection: close\r\nTransfer-Encoding: chunked\r\n"
            b"Idempotency-Key: \"cancel-7\"\r\n")
    first = raw(gw, head, b"0\r\n\r\n")
    assert first[0] == 201, first
    assert "idempotent-replayed" not in first[1], first
    again = raw(gw, head, b"0\r\n\r\n")
    assert again[0] == 201 and again[1].get("idempotent-replayed") == "true", again
    assert again[2] == first[2]
    time.sleep(0.2)
    runs = [a for a in pod.attempts() if a.get("path", "").startswith("/orders/7")]
    assert len(runs) == 1, runs
    assert_healthy(gw)


def harness_kind(harness) -> str:
    from tests.e2e.harness import GATEWAY
    return GATEWAY


ROUTING = {"routing": {"groups": [{"name": "a", "target": "group-a"},
                                  {"name": "b", "target": "group-b"}],
                       "methods": ["GET", "POST"]}}


def test_a_user_id_that_is_not_utf8_is_routed_like_any_other(harness):
    groups = {f"group-{g}": harness.group(g, 1) for g in "ab"}
    gw = harness.envoy(ROUTING, groups)
    seen = set()
    for _ in range(4):
        head = (b"GET /orders HTTP/1.1\r\nHost: api\r\nConnection: close\r\n"
                b"User-Id: \xff\xfe\x80user\r\n")
        status, headers, _ = raw(gw, head)
        assert status == 200, (status, headers)
        seen.add(headers.get("x-pod-group"))
    assert len(seen) == 1, f"the same bytes went to {seen}"
    assert_no_trap(gw)


def assert_no_trap(gw) -> None:
    time.sleep(0.2)
    log = gw.log()
    for sign in ("panicked", "wasm trap", "exited on signal", "unreachable"):
        assert sign not in log, f"{sign!r} in the gateway's log"
    assert gw.proc.poll() is None


WRK_USERS = """n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/orders", {["User-Id"] = "u-" .. tostring(os.time()) .. "-" .. n}, nil)
end
"""


def test_a_hundred_thousand_user_ids_keep_memory_flat(harness, tmp_path):
    groups = {f"group-{g}": harness.group(g, 1) for g in "ab"}
    gw = harness.envoy(ROUTING, groups)
    script = tmp_path / "users.lua"
    script.write_text(WRK_USERS)
    sent, errors, rss = wrk_until(gw.port, str(script), 100_000, gw.proc.pid)
    assert errors == 0, f"{errors} of {sent} answered non-2xx"
    # Routing keeps no state per user: memory after the first burst stays where it was.
    assert rss[-1] - rss[0] < 16 * 1024, f"private memory {rss} KiB"
    assert_no_trap(gw)
