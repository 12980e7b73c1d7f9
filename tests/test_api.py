"""The HTTP API against a real server: `arbor serve` as a subprocess on a free port, a real redis-server, a throwaway
PostgreSQL database and a real `arbor worker`. Submit, poll, results with the refinement rounds, progress as
server-sent events, the token, the body limit, per-line errors with nothing stored from a refused request, the
policy gate and rollback, runs, a queued train cycle, and the checked-in OpenAPI schema."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from tests.api_server import AUTH, LIMIT, TOKEN, start_serve
from tests.support import ArborProcess, RedisServer, arbor, arbor_env, free_port, postgres_database, seed_policy, worker

ROOT = Path(__file__).resolve().parents[1]
SEARCH = {"strategy": "greedy", "max_new_tokens": 6}  # an untrained policy: jobs finish in a moment


@contextmanager
def api_stack(root: Path, workers: int = 1, **env_extra):
    """redis-server, a PostgreSQL database with a promoted (untrained) built-in policy, `arbor serve` and
    `workers` search workers; yields a dict with the server's url, the env, the store and the processes."""
    from agent.store import Store

    server = RedisServer(root / "redis").start()
    procs: list[ArborProcess] = []
    try:
        with postgres_database() as db_url:
            home = root / "home"
            seed_policy(home, db_url)
            env = arbor_env(home, db_url, server.url, ARBOR_API_TOKEN=TOKEN, ARBOR_API_MAX_REQUEST_BYTES=LIMIT,
                            **env_extra)
            api, url, _ = start_serve(env, root)
            procs.append(api)
            for i in range(workers):
                procs.append(worker(f"search{i}", "search", env, root))
            for p in procs[1:]:
                p.wait_ready(180)
            store = Store(db_url)
            try:
                yield {"url": url, "env": env, "store": store, "home": home, "redis": server, "db_url": db_url,
                       "client": httpx.Client(base_url=url, headers=AUTH, timeout=60), "procs": procs}
            finally:
                store.engine.dispose()
                for p in reversed(procs):
                    p.stop(timeout=10)
    finally:
        for p in procs:
            p.stop(timeout=5)
        server.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with api_stack(tmp_path_factory.mktemp("api")) as s:
        yield s


def _counts(store) -> tuple[int, int]:
    from agent.schema import JobRow, ProblemRow

    with store.session() as s:
        return s.scalar(select(func.count()).select_from(ProblemRow)), s.scalar(select(func.count()).select_from(JobRow))


def _events(url: str, ids: list[str], timeout: float) -> list[tuple[str, dict]]:
    """Server-sent events from /api/events for `ids` until `end` (or the timeout)."""
    out, event = [], None
    query = [("job", j) for j in ids]
    with httpx.stream("GET", f"{url}/api/events", params=query, headers=AUTH, timeout=httpx.Timeout(timeout)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        deadline = time.monotonic() + timeout
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                out.append((event, json.loads(line[6:])))
                if event == "end":
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"no `end` event within {timeout} s; got {out}")
    return out


def test_openapi_served_is_the_checked_in_file(stack):
    served = stack["client"].get("/openapi.json").json()
    checked_in = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert served == checked_in, ("docs/openapi.json is stale: regenerate it with "
                                  "`.venv/bin/arbor serve --write-openapi docs/openapi.json`")
    paths = set(served["paths"])
    assert {"/api/jobs", "/api/jobs/upload", "/api/jobs/{job_id}", "/api/events", "/api/policies",
            "/api/policies/{version}/promote", "/api/policies/rollback", "/api/runs", "/api/runs/{name}",
            "/api/train"} <= paths


def test_every_route_needs_the_token(stack):
    url = stack["url"]
    assert httpx.get(f"{url}/api/health").status_code == 200  # the one open route
    for method, path in [("GET", "/api/jobs"), ("POST", "/api/jobs"), ("GET", "/api/jobs/x"), ("GET", "/api/events"),
                         ("GET", "/api/policies"), ("POST", "/api/policies/rollback"), ("GET", "/api/runs"),
                         ("POST", "/api/train"), ("POST", "/api/jobs/upload")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.request(method, f"{url}{path}", headers=headers, json={"problems": []} if method == "POST" else None)
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.headers.get("www-authenticate") == "Bearer"
    page = httpx.get(f"{url}/jobs")
    assert page.status_code == 303 and page.headers["location"] == "/login?next=/jobs"
    login = httpx.post(f"{url}/login", data={"token": "wrong", "next": "/jobs"})
    assert login.status_code == 401
    login = httpx.post(f"{url}/login", data={"token": TOKEN, "next": "/jobs"})
    assert login.status_code == 303 and login.cookies.get("arbor_session") not in (None, TOKEN)
    assert httpx.get(f"{url}/jobs", cookies=dict(login.cookies)).status_code == 200


def test_submit_follow_events_and_read_results(stack):
    client, store = stack["client"], stack["store"]
    problems = [{"prompt": "12+34=", "answer": "999"}, {"prompt": "5+7=", "answer": "999", "id": "api-five-seven"}]
    r = client.post("/api/jobs", json={"problems": problems, "refine": 2, "search": SEARCH})
    assert r.status_code == 201, r.text
    ids = r.json()["job_ids"]
    assert len(ids) == 2 and r.json()["problem_ids"][1] == "api-five-seven"
    assert store.get_problem(r.json()["problem_ids"][0]).prompt == "12+34="  # no id: named as a file line would be
    # stored before the ids were returned, with the whole search configuration
    assert store.get_job(ids[0]).params["search"]["strategy"] == "greedy"
    assert store.get_job(ids[0]).kind == "refine" and store.get_job(ids[0]).rounds == 2

    events = _events(stack["url"], ids, timeout=240)
    assert events[-1][0] == "end"
    for job_id in ids:
        states = [e["status"] for name, e in events if name == "job" and e["job_id"] == job_id]
        assert states and states[-1] == "done", states
        assert states.index("done") == len(states) - 1  # nothing after done

    for job_id in ids:
        job = client.get(f"/api/jobs/{job_id}").json()
        assert job["status"] == "done" and job["kind"] == "refine"
        # an untrained policy never gets 999: both rounds run; the position-coupled built-in policy is shown no
        # history, so round 1 repaired round 0's answer on the problem's own prompt
        assert job["result"]["rounds"] == 2 and [r["round"] for r in job["refinement"]] == [0, 1]
        assert job["refinement"][1]["prompt"] == job["problem"]["prompt"]
        assert [t["how"].split(":")[0] for t in job["result"]["tried"]] == ["search", "repair"]
        assert job["best"]["completion"] == job["result"]["best"]["completion"]
        assert job["best"]["verified"] is False
        assert sum(1 for r in job["refinement"] if r["best"]["is_best"]) == 1
        # each round's verdict is shown, and no round answered what an earlier round had been told was wrong
        assert [r["verdict"] for r in job["refinement"]] == ["rejected by the exact checker"] * 2
        assert job["result"]["stopped"] == "rounds" and len({t["answer"].strip() for t in job["result"]["tried"]}) == 2
    listed = {j["job_id"]: j for j in client.get("/api/jobs", params={"status": "done"}).json()}
    assert set(ids) <= set(listed) and all(listed[j]["best"] is not None for j in ids)
    assert client.get("/api/jobs/nope").status_code == 404


def test_upload_names_problems_as_the_cli_does(stack, tmp_path):
    from tasks import TASKS
    from tasks.jsonl import read_problems

    client = stack["client"]
    body = "\n".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) for i in range(3)) + "\n"
    r = client.post("/api/jobs/upload", files={"file": ("batch.jsonl", body.encode())},
                    data={"refine": "1", "search": json.dumps(SEARCH)})
    assert r.status_code == 201, r.text
    (tmp_path / "batch.jsonl").write_text(body)
    problems, _ = read_problems(tmp_path / "batch.jsonl", known_tasks=set(TASKS))
    assert r.json()["problem_ids"] == [p.id for p in problems]  # as `arbor submit batch.jsonl` names them
    assert stack["store"].get_job(r.json()["job_ids"][0]).kind == "solve"


def test_malformed_upload_is_refused_line_by_line_and_stores_nothing(stack, tmp_path):
    from tasks import TASKS
    from tasks.jsonl import read_problems

    client, store = stack["client"], stack["store"]
    lines = ['{"prompt": "1+1=", "answer": "2"}', '{"prompt": "2+2=", ', '{"answer": "3"}',
             '{"prompt": "3+3=", "checker": "eval"}', "[1, 2]", '{"prompt": "4+4=", "split": "test"}']
    text = "\n".join(lines) + "\n"
    before = _counts(store)
    r = client.post("/api/jobs/upload", files={"file": ("bad.jsonl", text.encode())})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("5 bad line(s) in bad.jsonl; nothing was submitted")
    (tmp_path / "bad.jsonl").write_text(text)
    _, cli_errors = read_problems(tmp_path / "bad.jsonl", known_tasks=set(TASKS))  # what `arbor submit` prints
    assert r.json()["errors"] == [{"line": e.line, "message": e.message} for e in cli_errors]
    assert [e["line"] for e in r.json()["errors"]] == [2, 3, 4, 5, 6]
    # the same checks on a JSON body, numbered from 1
    r = client.post("/api/jobs", json={"problems": [{"prompt": "1+1="}, {"prompt": ""}, "x"]})
    assert r.status_code == 422 and [e["line"] for e in r.json()["errors"]] == [2, 3]
    # a bad search configuration, a bad refine, an empty file, not UTF-8
    r = client.post("/api/jobs", json={"problems": [{"prompt": "1+1="}], "search": {"beams": "four"}})
    assert r.status_code == 422 and r.json()["detail"] == "search field 'beams' must be int (got \"four\")"
    r = client.post("/api/jobs", json={"problems": [{"prompt": "1+1="}], "search": {"beam": 4}})
    assert r.status_code == 422 and r.json()["detail"].startswith("unknown search field 'beam'")
    r = client.post("/api/jobs", json={"problems": [{"prompt": "1+1="}], "refine": 0})
    assert r.status_code == 422 and r.json()["detail"] == ("refine: refinement rounds must be a whole number from 1 to "
                                                           "20 (got 0)")
    r = client.post("/api/jobs/upload", files={"file": ("empty.jsonl", b"\n\n")})
    assert r.status_code == 422 and r.json()["detail"] == "empty.jsonl holds no problems"
    r = client.post("/api/jobs/upload", files={"file": ("latin.jsonl", '{"prompt": "caf\xe9"}'.encode("latin-1"))})
    assert r.status_code == 422 and "not UTF-8" in r.json()["detail"]
    assert _counts(store) == before


def test_oversized_request_is_refused_and_stores_nothing(stack):
    client, store = stack["client"], stack["store"]
    before = _counts(store)
    line = json.dumps({"prompt": "1+1=" + " " * 200, "answer": "2"})
    big = ("\n".join([line] * (LIMIT // len(line) + 10)) + "\n").encode()
    assert len(big) > LIMIT
    r = client.post("/api/jobs/upload", files={"file": ("big.jsonl", big)})
    assert r.status_code == 413 and f"over the limit of {LIMIT}" in r.json()["detail"]
    r = client.post("/api/jobs", json={"problems": [{"prompt": "1+1=" + " " * 300}] * (LIMIT // 300 + 10)})
    assert r.status_code == 413

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(LIMIT // 4096 + 4):
            yield b" " * 4096

    r = client.post("/api/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert _counts(store) == before


def test_promote_follows_the_gate_and_rollback_goes_back(stack):
    client, store = stack["client"], stack["store"]
    v0 = store.promoted_policy()
    for version, metrics in [("v91", {"gate_score": 0.5, "current_gate_score": 0.6}),
                             ("v92", {"gate_score": 0.8, "current_gate_score": 0.6}), ("v93", {})]:
        store.record_policy(version, v0.path, v0.version, "rejected", {}, metrics)
    r = client.post("/api/policies/v91/promote")
    assert r.status_code == 409 and "does not beat" in r.json()["detail"], r.text
    r = client.post("/api/policies/v93/promote")
    assert r.status_code == 409 and "never gated" in r.json()["detail"]
    assert client.post("/api/policies/v404/promote").status_code == 404
    r = client.post("/api/policies/v92/promote")
    assert r.status_code == 200 and r.json() == {"promoted": "v92", "previous": v0.version}
    status = {p["version"]: p["status"] for p in client.get("/api/policies").json()}
    assert status["v92"] == "promoted" and status[v0.version] == "retired"
    r = client.post("/api/policies/v91/promote")  # 0.5 against v92's own 0.8
    assert r.status_code == 409 and "v92's 0.800" in r.json()["detail"]
    r = client.post("/api/policies/rollback")
    assert r.status_code == 200 and r.json() == {"promoted": v0.version, "previous": "v92"}
    status = {p["version"]: p["status"] for p in client.get("/api/policies").json()}
    assert status[v0.version] == "promoted" and status["v92"] == "rejected"
    r = client.post("/api/policies/rollback")
    assert r.status_code == 409 and "nothing to roll back to" in r.json()["detail"]
    assert store.promoted_policy().version == v0.version


def write_run(runs_dir: Path, name: str) -> dict:
    """A run report as `arbor run` writes it (agent/report.py), three cycles."""
    from agent.loop import CycleRecord
    from agent.report import write_report

    records = [CycleRecord(cycle=c, policy_version=f"v{c}", candidate=f"v{c + 1}", promoted=c != 1, frontier=str(c + 3),
                           heldout={"2": 0.9 + 0.03 * c, "4": 0.2 + 0.3 * c, "6": 0.05 * c},
                           self_verified={"4": 0.25 + 0.3 * c}, gate={"candidate": 0.3 + 0.2 * c, "current": 0.3 + 0.15 * c},
                           accepted=100 + 10 * c, train={"train_loss": 0.5 - 0.1 * c},
                           filters=[{"name": "format", "kept_fraction": 0.9, "precision": 0.8 + 0.05 * c},
                                    {"name": "decomposition", "kept_fraction": 0.5, "precision": 0.97}],
                           seconds={"search": 10.0}, elapsed_s=60.0 * (c + 1)) for c in range(3)]
    return write_report(runs_dir / name, records, final_policy="v3", config={"select": "label_free"})


def test_runs_are_served(stack):
    client = stack["client"]
    write_run(stack["home"] / "runs", "run-a")
    runs = client.get("/api/runs").json()
    assert [r["name"] for r in runs] == ["run-a"] and runs[0]["cycles"] == 3 and runs[0]["promoted"] == 2
    report = client.get("/api/runs/run-a").json()
    assert [c["cycle"] for c in report["cycles"]] == [0, 1, 2] and report["cycles"][2]["filters"][0]["precision"] == 0.9
    png = client.get("/api/runs/run-a/learning_curve.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    for name in ("nope", "..", "run-a%2F..%2F..", ".hidden"):
        assert client.get(f"/api/runs/{name}").status_code == 404


def test_train_cycle_is_queued_for_the_trainer(stack):
    import redis

    r = stack["client"].post("/api/train")
    assert r.status_code == 202, r.text
    broker = redis.Redis.from_url(stack["redis"].url)
    queued = [json.loads(m) for m in broker.lrange("train", 0, -1)]
    assert [m["headers"]["id"] for m in queued] == [r.json()["task_id"]]
    assert queued[0]["headers"]["task"] == "arbor.train_cycle"
    broker.delete("train")  # no trainer here: the cycle itself is agent/train_cycle.py's test


def test_serve_refuses_to_start_without_a_token(tmp_path):
    env = arbor_env(tmp_path / "home", f"sqlite:///{tmp_path / 'a.db'}", None)
    env.pop("ARBOR_API_TOKEN", None)
    env.pop("ARBOR_API_TOKEN_FILE", None)
    res = arbor("serve", "--port", str(free_port()), env=env, timeout=60)
    assert res.returncode == 1
    assert res.stderr.strip() == ("error: no API token: set ARBOR_API_TOKEN or ARBOR_API_TOKEN_FILE (or serve with "
                                  "--no-auth on a trusted host)")
    res = arbor("serve", env={**env, "ARBOR_API_TOKEN_FILE": str(tmp_path / "missing")}, timeout=60)
    assert res.returncode == 1 and "ARBOR_API_TOKEN_FILE=" in res.stderr and "cannot read it" in res.stderr


def test_token_from_a_file(monkeypatch, tmp_path):
    from agent.settings import Settings
    from arbor.api import resolve_token

    (tmp_path / "token").write_text("from-a-file-0123456789\n")
    monkeypatch.delenv("ARBOR_API_TOKEN", raising=False)
    monkeypatch.setenv("ARBOR_API_TOKEN_FILE", str(tmp_path / "token"))
    assert resolve_token(Settings(device="cpu")) == "from-a-file-0123456789"
    monkeypatch.setenv("ARBOR_API_TOKEN", "from-the-environment")  # 20 characters
    assert resolve_token(Settings(device="cpu")) == "from-the-environment"
    monkeypatch.setenv("ARBOR_API_TOKEN", "too-short")
    with pytest.raises(ValueError, match="ARBOR_API_TOKEN holds a token of 9 characters: use at least 16"):
        resolve_token(Settings(device="cpu"))
    monkeypatch.setenv("ARBOR_API_MAX_REQUEST_BYTES", "10")
    with pytest.raises(ValueError, match="ARBOR_API_MAX_REQUEST_BYTES must be at least 1024"):
        Settings(device="cpu")
