"""API benchmark: what the HTTP layer costs on submission, and how many status polls it serves while workers search.
Real parts: a redis-server started here, a throwaway PostgreSQL database, `arbor serve` and `arbor worker`
subprocesses (one torch thread each), the untrained built-in policy.

    python bench/api.py                        # JSON on stdout
    python bench/api.py --out bench/results/api.json

Submit latency: one problem per request, sent one at a time. API: POST /api/jobs from a keep-alive client to the
response (JSON parsing, the JSONL checks, the search configuration checks, the store's transaction, the Celery
message). In process: the same steps that `arbor submit` runs after its own start-up, called here (read_problems,
the search configuration, agent.jobs.submit_jobs, send_task). `arbor submit` as a process: the command a person
types, start-up included.
Polling: GET /api/jobs/{id} (a running job: store reads and the task's progress from the result backend) from
`--clients` threads for `--seconds`, first with the workers idle, then with 2 workers busy on a batch of
best-of-8 jobs.

    python bench/api.py --streams-only [--server-code DIR]   # progress streams: health latency, server CPU

Progress streams: `--streams` open GET /api/events streams (no job ids: the newest jobs) on a store of `--stream-jobs`
queued jobs (PostgreSQL, a broker configured, no workers: nothing changes), while one client asks GET /api/health
one request after another for `--seconds`: its latency p50/p99, and the `arbor serve` process's CPU (psutil) as a
share of one core, in all and per stream. `--server-code DIR` runs the server from another checkout (the code
before a change: `git worktree add DIR COMMIT`).
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds queue.py: drop this folder from the path so that `import queue` finds the standard library
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402

from tests.support import ArborProcess, RedisServer, arbor, arbor_env, free_port, postgres_database, seed_policy, wait_for, worker  # noqa: E402

TOKEN = "bench-token-0123456789"
LIGHT = {"strategy": "greedy", "max_new_tokens": 8}
HEAVY = {"strategy": "best_of_n", "n": 8, "max_new_tokens": 32}


def _ms(values: list[float]) -> dict:
    values = sorted(values)
    return {"median_ms": round(statistics.median(values) * 1000, 2),
            "p90_ms": round(values[int(0.9 * (len(values) - 1))] * 1000, 2), "n": len(values)}


def _in_process_submit(store, folder: Path, i: int) -> float:
    """What `arbor submit` does after its start-up, for one problem in a file, timed."""
    from dataclasses import asdict

    from agent.jobs import submit_jobs
    from arbor.submission import JOB_SEARCH
    from search import SearchConfig
    from tasks import TASKS
    from tasks.jsonl import read_problems
    from workers.app import app as celery_app

    path = folder / f"inproc-{i}.jsonl"
    path.write_text(json.dumps({"prompt": f"{i % 90 + 10}+{i % 70 + 20}=", "id": f"inproc-{i}"}) + "\n")
    start = time.perf_counter()
    problems, errors = read_problems(path, known_tasks=set(TASKS))
    assert not errors
    search = asdict(SearchConfig(**{**asdict(JOB_SEARCH), **LIGHT}))
    for job_id in submit_jobs(store, problems, rounds=1, search=search):
        celery_app.send_task("arbor.solve", args=[job_id], task_id=job_id)
    return time.perf_counter() - start


def _poll(url: str, job_ids: list[str], clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def run(k: int):
        mine = []
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
            n = k
            while time.monotonic() < stop:
                t = time.perf_counter()
                r = c.get(f"/api/jobs/{job_ids[n % len(job_ids)]}")
                mine.append(time.perf_counter() - t)
                if r.status_code != 200:
                    errors[0] += 1
                n += 1
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return {"requests_per_s": round(len(latencies) / elapsed, 1), **_ms(latencies), "errors": errors[0],
            "clients": clients, "seconds": round(elapsed, 1)}


def _streams(args) -> dict:
    """Health latency and server CPU with `args.streams` open progress streams on `args.stream_jobs` jobs."""
    import os

    import psutil

    from agent.jobs import submit_jobs
    from agent.store import Store
    from tasks.base import Problem

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = RedisServer(root / "redis").start()
        api = None
        try:
            with postgres_database() as db_url:
                store = Store(db_url)
                problems = [Problem(prompt=f"{i % 90 + 10}+{i % 70 + 20}=", id=f"s-{i}") for i in range(args.stream_jobs)]
                submit_jobs(store, problems, rounds=1, search=LIGHT)
                store.engine.dispose()
                extra = {"PYTHONPATH": str(args.server_code)} if args.server_code else {}
                env = arbor_env(root / "home", db_url, server.url, ARBOR_API_TOKEN=TOKEN, **extra)
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                api = ArborProcess(["serve", "--port", str(port), "--log-level", "warning"], env, root / "serve.log").start()
                wait_for(lambda: _up(url), 120, "arbor serve")
                stop = threading.Event()
                opened = [0]

                def follow():
                    try:
                        _follow()
                    except httpx.HTTPError:
                        if not stop.is_set():
                            raise

                def _follow():
                    with httpx.stream("GET", f"{url}/api/events", headers={"Authorization": f"Bearer {TOKEN}"},
                                      timeout=httpx.Timeout(60, read=None)) as r:
                        assert r.status_code == 200, r.status_code
                        opened[0] += 1
                        for _ in r.iter_lines():
                            if stop.is_set():
                                return

                threads = [threading.Thread(target=follow, daemon=True) for _ in range(args.streams)]
                for t in threads:
                    t.start()
                wait_for(lambda: opened[0] == args.streams, 60, "the streams to open")
                time.sleep(3)  # past the first full reads
                proc = psutil.Process(api.proc.pid)
                procs = [proc, *proc.children(recursive=True)]
                cpu0 = sum(p.cpu_times().user + p.cpu_times().system for p in procs)
                start, latencies = time.perf_counter(), []
                with httpx.Client(base_url=url, timeout=30) as c:
                    while time.perf_counter() - start < args.seconds:
                        t = time.perf_counter()
                        assert c.get("/api/health").status_code == 200
                        latencies.append(time.perf_counter() - t)
                        time.sleep(0.01)
                wall = time.perf_counter() - start
                cpu = sum(p.cpu_times().user + p.cpu_times().system for p in procs) - cpu0
                stop.set()
                latencies.sort()
                share = cpu / wall
                return {"streams": args.streams, "jobs": args.stream_jobs, "seconds": round(wall, 1),
                        "server_code": str(args.server_code or "this checkout"),
                        "health_p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
                        "health_p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))] * 1000, 2),
                        "health_requests": len(latencies), "server_cpu_share_of_a_core": round(share, 4),
                        "per_stream_cpu_share": round(share / args.streams, 5), "machine_cpus": os.cpu_count()}
        finally:
            if api is not None:
                api.stop(timeout=10)
            server.stop()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--submits", type=int, default=60, help="single-problem submissions per path")
    ap.add_argument("--cli-runs", type=int, default=3, help="`arbor submit` processes timed")
    ap.add_argument("--clients", type=int, default=4, help="concurrent polling clients")
    ap.add_argument("--seconds", type=float, default=15, help="polling time per phase")
    ap.add_argument("--busy-jobs", type=int, default=400, help="best-of-8 jobs that keep the 2 workers busy")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--streams-only", action="store_true", help="only the progress-stream measurement")
    ap.add_argument("--streams", type=int, default=20, help="open progress streams")
    ap.add_argument("--stream-jobs", type=int, default=5000, help="jobs in the store for the stream measurement")
    ap.add_argument("--server-code", type=Path, help="run `arbor serve` from this checkout (the code before)")
    args = ap.parse_args(argv)
    if args.streams_only:
        out = {"streams": _streams(args)}
        text = json.dumps(out, indent=2)
        if args.out:
            args.out.write_text(text + "\n")
        print(text)
        return out

    from agent.store import Store

    out: dict = {"machine": {"cpus": __import__("os").cpu_count()}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = RedisServer(root / "redis").start()
        procs: list[ArborProcess] = []
        try:
            with postgres_database() as db_url:
                seed_policy(root / "home", db_url)
                env = arbor_env(root / "home", db_url, server.url, ARBOR_API_TOKEN=TOKEN)
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                procs.append(ArborProcess(["serve", "--port", str(port), "--log-level", "warning"], env,
                                          root / "serve.log").start())
                wait_for(lambda: _up(url), 120, "arbor serve")
                store = Store(db_url)
                import os

                os.environ.update({k: v for k, v in env.items() if k.startswith("ARBOR_")})  # this process's Settings
                client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)

                # submit latency (no worker yet: the messages wait in Redis; only submission is timed)
                for i in range(3):  # warm both paths: imports, connections
                    client.post("/api/jobs", json={"problems": [{"prompt": "1+1="}], "search": LIGHT})
                    _in_process_submit(store, root, 10_000 + i)
                api = []
                for i in range(args.submits):
                    body = {"problems": [{"prompt": f"{i % 90 + 10}+{i % 70 + 20}=", "id": f"api-{i}"}], "search": LIGHT}
                    t = time.perf_counter()
                    r = client.post("/api/jobs", json=body)
                    api.append(time.perf_counter() - t)
                    assert r.status_code == 201, r.text
                inproc = [_in_process_submit(store, root, i) for i in range(args.submits)]
                problem_file = root / "one.jsonl"
                cli = []
                for i in range(args.cli_runs):
                    problem_file.write_text(json.dumps({"prompt": "3+4=", "id": f"cli-{i}"}) + "\n")
                    t = time.perf_counter()
                    res = arbor("submit", str(problem_file), "--strategy", "greedy", "--max-new-tokens", "8", env=env)
                    cli.append(time.perf_counter() - t)
                    assert res.returncode == 0, res.stderr
                out["submit"] = {"api": _ms(api), "in_process": _ms(inproc), "arbor_submit_process": _ms(cli)}
                out["submit"]["api_overhead_median_ms"] = round(
                    out["submit"]["api"]["median_ms"] - out["submit"]["in_process"]["median_ms"], 2)
                import redis

                redis.Redis.from_url(server.url).delete("search")  # the latency jobs are not worked on

                # polling: idle, then with 2 workers busy
                busy = client.post("/api/jobs", json={"problems": [{"prompt": f"{i % 90 + 10}+{i % 70 + 20}=",
                                                                    "id": f"busy-{i}"} for i in range(args.busy_jobs)],
                                                      "search": HEAVY}).json()["job_ids"]
                polled = busy[:50]
                out["poll_idle"] = _poll(url, polled, args.clients, args.seconds)
                for i in range(2):
                    procs.append(worker(f"search{i}", "search", env, root))
                for p in procs[1:]:
                    p.wait_ready(300)
                wait_for(lambda: sum(store.get_job(j).status == "running" for j in busy[:20]) >= 2, 120, "2 running jobs")
                done_before = sum(store.get_job(j).status == "done" for j in busy)
                out["poll_busy"] = _poll(url, polled, args.clients, args.seconds)
                done_after = sum(store.get_job(j).status == "done" for j in busy)
                out["poll_busy"]["jobs_finished_meanwhile"] = done_after - done_before
                assert sum(store.get_job(j).status == "running" for j in busy) >= 1, "workers went idle during polling"
                store.engine.dispose()
        finally:
            for p in reversed(procs):
                p.stop(timeout=10)
            server.stop()
    text = json.dumps(out, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return out


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
