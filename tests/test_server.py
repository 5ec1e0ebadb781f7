"""`infinictx serve` (first step): a real uvicorn on a free local port, the tiny model, an httpx client."""

import socket
import threading
import time

import pytest
from conftest import SAMPLE

from infinictx import weights_fingerprint

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")


@pytest.fixture
def server(tiny):
    from infinictx.fronts.server import ServeSettings, create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(tiny, ServeSettings(api_keys=("k1", "k2"), max_sessions=3, max_request_tokens=400))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    before = weights_fingerprint(tiny.model)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        yield client
    srv.should_exit = True
    thread.join(timeout=30)
    assert weights_fingerprint(tiny.model) == before   # every session's adapter gone, base untouched
    assert not any("lora_" in n for n, _ in tiny.model.named_parameters())


K1, K2 = {"Authorization": "Bearer k1"}, {"Authorization": "Bearer k2"}


def new(client, headers=K1, **body):
    r = client.post("/v1/sessions", json={"method": "temp-lora", "settings": {"window": 64, "chunk": 16, "rank": 4,
                                                                              "lr": 1e-2}, **body}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def test_read_generate_describe_delete(server):
    sid = new(server)
    r = server.post(f"/v1/sessions/{sid}/read", json={"text": SAMPLE, "score": True}, headers=K1)
    assert r.status_code == 200 and r.json()["tokens"] == r.json()["tokens_read"] > 0 and r.json()["ppl"] > 1
    r = server.post(f"/v1/sessions/{sid}/generate", json={"max_tokens": 8}, headers=K1)
    assert r.status_code == 200 and r.json()["tokens"] == 8
    info = server.get(f"/v1/sessions/{sid}", headers=K1).json()
    assert info["tokens"] > 8 and info["adapter_steps"] > 0
    assert server.delete(f"/v1/sessions/{sid}", headers=K1).status_code == 200
    assert server.get(f"/v1/sessions/{sid}", headers=K1).status_code == 404


def test_two_sessions_keep_their_own_adapter(server):
    """Each session's adapter learns its own text: re-reading it scores lower than the other session does."""
    texts = [SAMPLE, " ".join(reversed(SAMPLE.split()))]
    ids = [new(server), new(server)]
    for sid, text in zip(ids, texts):
        for _ in range(3):
            assert server.post(f"/v1/sessions/{sid}/read", json={"text": text}, headers=K1).status_code == 200
    own = server.post(f"/v1/sessions/{ids[0]}/read", json={"text": texts[0], "score": True}, headers=K1).json()
    other = server.post(f"/v1/sessions/{ids[1]}/read", json={"text": texts[0], "score": True}, headers=K1).json()
    assert own["ppl"] < other["ppl"]


def test_auth_and_ownership(server):
    assert server.post("/v1/sessions", json={}).status_code == 401
    assert server.post("/v1/sessions", json={}, headers={"Authorization": "Bearer nope"}).status_code == 401
    sid = new(server, K1)
    r = server.get(f"/v1/sessions/{sid}", headers=K2)
    assert r.status_code == 404 and r.json() == {"error": f"no session {sid}"}   # not 403: ids cannot be probed


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/sessions", {"method": "nope"}, 400, "unknown method"),
    ("/v1/sessions", {"method": "window", "settings": {"window": -1}}, 400, "window"),
    ("/v1/sessions", {"method": "temp-lora", "settings": {"lr": float("nan")}}, 400, "lr"),
    ("/v1/sessions", {"method": 3}, 400, "invalid request"),
])
def test_bad_requests_get_one_line_json(server, path, body, status, message):
    import json

    r = server.post(path, content=json.dumps(body), headers={**K1, "Content-Type": "application/json"})
    assert r.status_code == status and message in r.json()["error"] and "\n" not in r.json()["error"]


def test_bad_reads(server):
    sid = new(server)
    assert server.post(f"/v1/sessions/{sid}/read", json={"text": "   "}, headers=K1).status_code == 400
    r = server.post(f"/v1/sessions/{sid}/read", json={"text": SAMPLE * 20}, headers=K1)
    assert r.status_code == 413 and "at most 400" in r.json()["error"]
    r = server.post(f"/v1/sessions/{sid}/read", content=b"\xff\xfe{",
                    headers={**K1, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"].startswith("invalid request")
    assert server.post("/v1/sessions/none/read", json={"text": "x"}, headers=K1).status_code == 404
    r = server.post(f"/v1/sessions/{sid}/generate", json={"max_tokens": 4}, headers=K1)
    assert r.status_code == 400 and "read nothing" in r.json()["error"]


def test_session_limit(server):
    for _ in range(3):
        new(server)
    r = server.post("/v1/sessions", json={"method": "window"}, headers=K1)
    assert r.status_code == 429 and "maximum of 3" in r.json()["error"]


def test_concurrent_reads_of_one_session_all_count(server):
    sid = new(server, method="window", settings={"window": 64, "chunk": 16})
    assert server.post(f"/v1/sessions/{sid}/read", json={"text": SAMPLE}, headers=K1).status_code == 200
    results = []

    def read():
        results.append(server.post(f"/v1/sessions/{sid}/read", json={"text": SAMPLE}, headers=K1).status_code)

    threads = [threading.Thread(target=read) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 6
    one = server.post(f"/v1/sessions/{sid}/read", json={"text": SAMPLE}, headers=K1).json()
    assert one["tokens"] == 8 * one["tokens_read"]   # 1 + 6 + 1 reads, none lost
