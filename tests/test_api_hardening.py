"""The HTTP layer against a real `arbor serve` (uvicorn, a real redis-server, SQLite and PostgreSQL): the token
and the body limit before any body is read, whatever the framing headers say; a clear status for every bad input
(never a bare 500); the session cookie; the docs behind the token; the progress stream's limits."""

from __future__ import annotations

import json
import socket
import subprocess

import httpx
import pytest

from tests.api_server import AUTH, LIMIT, TOKEN, served
from tests.support import wait_for


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def api(request, tmp_path_factory):
    with served(tmp_path_factory.mktemp(f"hardening-{request.param}"), request.param, "--max-streams", "3") as s:
        s["db"] = request.param
        yield s


def raw_request(port: int, head: str, chunks=(), timeout: float = 30) -> tuple[int, bytes]:
    """One HTTP/1.1 request over a plain socket (the headers exactly as given); (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head.encode("latin-1"))
        try:
            for chunk in chunks:
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed without reading the rest: what it should do
        data = b""
        while b"\r\n\r\n" not in data:
            more = s.recv(65536)
            if not more:
                break
            data += more
        head_bytes, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head_bytes.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), None)
        while length is not None and len(body) < length:
            more = s.recv(65536)
            if not more:
                break
            body += more
    return int(head_bytes.split(b" ")[1]), body


def chunked(total: int, size: int = 16384):
    block = b"x" * size
    for _ in range(total // size):
        yield b"%x\r\n" % size + block + b"\r\n"
    yield b"0\r\n\r\n"


def head(path: str, *headers: str) -> str:
    return f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n"


def test_no_body_is_read_before_the_token_whatever_the_framing(api):
    big = 20 * LIMIT
    both = ("Content-Type: application/json", "Transfer-Encoding: chunked", "Content-Length: 10")
    status, body = raw_request(api["port"], head("/api/jobs", *both), chunked(big))
    assert status in (400, 401), (status, body[:300])
    status, body = raw_request(api["port"], head("/api/jobs", *both, f"Authorization: Bearer {TOKEN}"), chunked(big))
    assert status == 400 and b"Transfer-Encoding" in body, (status, body[:300])
    # chunked alone: no token is 401 before the body, a token and a body over the limit is 413
    status, body = raw_request(api["port"], head("/api/jobs", *both[:2]), chunked(big))
    assert status == 401, (status, body[:300])
    status, body = raw_request(api["port"], head("/api/jobs", *both[:2], f"Authorization: Bearer {TOKEN}"),
                               chunked(big))
    assert status == 413 and f"limit of {LIMIT}".encode() in body, (status, body[:300])
    # a Content-Length over the limit: refused from the header, no token needed to learn that nothing was read
    status, _ = raw_request(api["port"], head("/api/jobs", "Content-Type: application/json",
                                              f"Content-Length: {LIMIT + 1}"))
    assert status in (401, 413)
    assert httpx.get(f"{api['url']}/api/health").status_code == 200


def test_bad_input_gets_a_clear_status_never_a_500(api):
    client = httpx.Client(base_url=api["url"], headers=AUTH, timeout=30)
    good = [{"prompt": "1+1=", "answer": "2"}]
    for refine in (2**63, 2**31, 10**9, 21, 0):
        r = client.post("/api/jobs", json={"problems": good, "refine": refine})
        assert r.status_code == 422 and isinstance(r.json()["detail"], str), (refine, r.text)
        assert "from 1 to 20" in r.json()["detail"]
        r = client.post("/api/jobs/upload", files={"file": ("p.jsonl", json.dumps(good[0]).encode())},
                        data={"refine": str(refine)})
        assert r.status_code == 422 and "from 1 to 20" in r.json()["detail"], (refine, r.text)
    r = client.post("/api/jobs/upload", files={"file": ("a" * 300 + ".jsonl", json.dumps(good[0]).encode())})
    assert r.status_code == 201, r.text
    # a lone surrogate, in a problem and in a field FastAPI itself refuses
    raw = '{"problems": [{"prompt": "a\\ud800b"}]}'
    r = client.post("/api/jobs", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "prompt" in r.text, r.text
    r = client.post("/api/jobs", content='{"problems": [{"prompt": "1+1="}], "refine": "\\ud800"}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    # nesting deeper than the parser's recursion limit, as a form field and as the body
    r = client.post("/api/jobs/upload", files={"file": ("p.jsonl", json.dumps(good[0]).encode())},
                    data={"search": "[" * 30000 + "]" * 30000})
    assert r.status_code == 422 and "nested" in r.json()["detail"], r.text
    r = client.post("/api/jobs", content='{"problems": ' + "[" * 30000 + "]" * 30000 + "}",
                    headers={"content-type": "application/json"})
    assert r.status_code in (400, 422) and "detail" in r.json(), r.text  # FastAPI's own parser: a 400
    r = client.post("/api/jobs", json={"problems": []})
    assert r.status_code == 422, r.text
    r = client.post("/api/jobs/upload", files={"file": ("empty.jsonl", b"")})
    assert r.status_code == 422 and r.json()["detail"] == "empty.jsonl holds no problems", r.text
    # ids that cannot be ids (a NUL byte: PostgreSQL refuses it in a query) are refused before any query
    for path in ("/api/jobs/a%00b", "/api/events?job=a%00b", "/api/jobs/" + "x" * 300,
                 "/api/policies/a%00b/promote"):
        r = client.request("POST" if path.endswith("promote") else "GET", path)
        assert r.status_code in (404, 422) and "detail" in r.json(), (path, r.status_code, r.text)
    cookies = _login(api["url"])
    for path in ("/jobs/a%00b", "/jobs/a%00b/tree"):
        r = httpx.get(f"{api['url']}{path}", cookies=cookies)
        assert r.status_code in (404, 422) and "id" in r.text, (path, r.status_code)


def test_a_damaged_report_is_named_not_a_traceback(api):
    run = api["home"] / "runs" / "broken"
    run.mkdir(parents=True)
    (run / "report.json").write_text('{"cycles": [{"cycle": 0, "heldout"')
    r = httpx.get(f"{api['url']}/api/runs/broken", headers=AUTH)
    assert r.status_code == 503 and "damaged" in r.json()["detail"], r.text
    r = httpx.get(f"{api['url']}/runs/broken", cookies=_login(api["url"]))
    assert r.status_code == 503 and "damaged" in r.text
    assert httpx.get(f"{api['url']}/api/runs", headers=AUTH).status_code == 200


def _login(url: str) -> dict:
    r = httpx.post(f"{url}/login", data={"token": TOKEN, "next": "/jobs"})
    assert r.status_code == 303
    return dict(r.cookies)


def test_the_session_cookie_is_a_session_not_the_token(api):
    url = api["url"]
    r = httpx.post(f"{url}/login", data={"token": TOKEN, "next": "/jobs"})
    cookie = r.headers["set-cookie"]
    assert TOKEN not in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie
    cookies = dict(r.cookies)
    assert httpx.get(f"{url}/jobs", cookies=cookies).status_code == 200
    # the cookie is the web view's: the JSON API wants the header
    assert httpx.get(f"{url}/api/jobs", cookies=cookies).status_code == 401
    assert httpx.get(f"{url}/jobs", cookies={next(iter(cookies)): TOKEN}).status_code == 303  # the token is no session
    # a state-changing request from another site is refused even with the cookie
    r = httpx.post(f"{url}/policies/rollback", cookies=cookies, headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403
    r = httpx.post(f"{url}/policies/rollback", cookies=cookies, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    # over https (a TLS proxy in front says so) the cookie is Secure
    r = httpx.post(f"{url}/login", data={"token": TOKEN, "next": "/jobs"}, headers={"X-Forwarded-Proto": "https"})
    assert "Secure" in r.headers["set-cookie"]
    # logging out ends the session on the server
    assert httpx.post(f"{url}/logout", cookies=cookies).status_code == 303
    assert httpx.get(f"{url}/jobs", cookies=cookies).status_code == 303


def test_docs_and_schema_need_the_token(api):
    url = api["url"]
    assert httpx.get(f"{url}/openapi.json").status_code == 401
    for path in ("/docs", "/redoc"):
        r = httpx.get(f"{url}{path}")
        assert r.status_code == 303 and r.headers["location"].startswith("/login"), path
    assert httpx.get(f"{url}/docs", headers=AUTH).status_code == 404  # no pages that load scripts from a CDN
    assert httpx.get(f"{url}/openapi.json", headers=AUTH).json()["info"]["title"] == "Arbor"
    assert httpx.get(f"{url}/static/style.css").status_code in (200, 404)  # static files stay open


def test_event_streams_are_bounded(api):
    url = api["url"]
    r = httpx.get(f"{url}/api/events", params=[("job", f"j{i}") for i in range(201)], headers=AUTH)
    assert r.status_code == 422 and "200" in r.json()["detail"]
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as client:
        streams = [client.stream("GET", "/api/events") for _ in range(3)]
        opened = [s.__enter__() for s in streams]
        try:
            assert all(s.status_code == 200 for s in opened)
            r = httpx.get(f"{url}/api/events", headers=AUTH)
            assert r.status_code == 503 and "streams" in r.json()["detail"], r.text
            assert httpx.get(f"{url}/api/health").status_code == 200
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    def opens() -> bool:
        with httpx.stream("GET", f"{url}/api/events", headers=AUTH, timeout=30) as s:
            return s.status_code == 200

    wait_for(opens, 15, "the server to notice the closed streams", interval=0.5)


def test_a_database_that_is_down_is_a_503(tmp_path):
    from sqlalchemy import create_engine, text

    from tests.support import PG_ADMIN_URL

    with served(tmp_path, "postgresql") as s:
        assert httpx.get(f"{s['url']}/api/jobs", headers=AUTH).status_code == 200
        name = s["db_url"].rsplit("/", 1)[1]
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()
        for path in ("/api/jobs", "/api/jobs/x", "/api/policies"):
            r = httpx.get(f"{s['url']}{path}", headers=AUTH, timeout=30)
            assert r.status_code == 503 and "database" in r.json()["detail"], (path, r.text)
        r = httpx.post(f"{s['url']}/api/jobs", headers=AUTH, json={"problems": [{"prompt": "1+1="}]}, timeout=30)
        assert r.status_code == 503, r.text


def _fill(folder) -> None:
    try:
        with open(folder / "filler", "wb") as f:
            f.write(b"x" * 65536)
    except OSError:
        pass  # full: what the test wants


def test_a_full_disk_on_upload_is_a_503(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(full)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        with served(tmp_path / "srv", "sqlite", TMPDIR=str(full)) as s:
            upload = {"file": ("p.jsonl", b'{"prompt": "1+1="}\n')}
            r = httpx.post(f"{s['url']}/api/jobs/upload", headers=AUTH, timeout=30, files=upload)
            assert r.status_code == 201, r.text  # and the server's temporary folder is TMPDIR from now on
            _fill(full)  # only now: Python takes TMPDIR as its temporary folder only if it can write there
            r = httpx.post(f"{s['url']}/api/jobs/upload", headers=AUTH, timeout=30,
                           files={"file": ("q.jsonl", b'{"prompt": "2+2="}\n')})
            assert r.status_code == 503 and "space" in r.json()["detail"], r.text
    finally:
        subprocess.run(["umount", "-l", str(full)], capture_output=True)


def test_the_schema_documents_every_refusal_and_bound():
    from pathlib import Path

    schema = json.loads((Path(__file__).resolve().parents[1] / "docs" / "openapi.json").read_text())
    body = schema["components"]["schemas"]["SubmitBody"]["properties"]
    assert body["refine"]["minimum"] == 1 and body["refine"]["maximum"] == 20 and body["problems"]["minItems"] == 1
    upload = schema["components"]["schemas"]["Body_submit_upload_api_jobs_upload_post"]["properties"]
    assert upload["refine"]["minimum"] == 1 and upload["refine"]["maximum"] == 20
    ops = {(m.upper(), p): op for p, item in schema["paths"].items() for m, op in item.items()}
    assert "/docs" not in schema["paths"] and ("GET", "/api/health") in ops
    for (method, path), op in ops.items():
        codes = set(op["responses"])
        if path != "/api/health":
            assert "401" in codes and op["security"] == [{"HTTPBearer": []}], (method, path)
        if "{" in path or op.get("parameters"):
            assert "422" in codes or "{name}" in path, (method, path)
        if method == "POST" and "requestBody" in op:
            assert {"400", "413", "422", "503"} <= codes, (method, path)
    for op in (ops[("GET", "/api/jobs/{job_id}")], ops[("GET", "/api/runs/{name}")], ops[("GET", "/api/events")],
               ops[("POST", "/api/policies/{version}/promote")]):
        assert {"404", "503"} <= set(op["responses"])
    refused = schema["components"]["schemas"]["Refused"]["properties"]["detail"]
    assert {t.get("type") for t in refused["anyOf"]} == {"string", "array"}  # one line, or FastAPI's list
    assert ops[("GET", "/api/events")]["parameters"][0]["schema"]["maxItems"] == 200
    limit = next(p for p in ops[("GET", "/api/jobs")]["parameters"] if p["name"] == "limit")
    assert limit["schema"]["anyOf"][0]["maximum"] == 500
