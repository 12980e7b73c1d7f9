"""Queue benchmark: per-job overhead of the Celery path against an in-process call, and throughput of 2
workers against 1. Real parts: a redis-server started here, a throwaway PostgreSQL database, real
`arbor worker` subprocesses (prefork, one child, one torch thread each), the untrained built-in policy.

    python bench/queue.py                      # JSON on stdout
    python bench/queue.py --out bench/queue.json --jobs 40

Overhead: one worker, jobs sent one at a time; end-to-end time from `send_task` to the result being readable
(the result backend's pub/sub), minus the same job run in this process through the same plain function
(`agent.jobs.run_job`, store writes included), each with one torch thread. Goal: median at most 50 ms.
Throughput: the same batch of heavier jobs (best-of-8, 32 tokens) drained by 1 worker, then by 2 workers,
from the first send to the last job finished in the store. Goal on this 2-core machine: at least 1.8x.
"""

from __future__ import annotations

import sys
from pathlib import Path

# this file is named queue.py: drop its folder from the path so that `import queue` finds the standard library
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import statistics
import tempfile
import time

from tasks import Problem  # noqa: E402
from tests.support import RedisServer, arbor_env, postgres_database, seed_policy, worker  # noqa: E402

LIGHT = {"strategy": "greedy", "max_new_tokens": 8}
HEAVY = {"strategy": "best_of_n", "n": 8, "max_new_tokens": 32}


def _jobs(store, prefix: str, n: int, search: dict) -> list[str]:
    ids = store.add_problems([Problem(f"{i % 90 + 10}+{i % 70 + 20}=", None, id=f"{prefix}{i}") for i in range(n)])
    return [store.create_job("solve", problem_id=pid, params={"search": search}) for pid in ids]


def _drain(celery_app, store, job_ids: list[str], timeout: float = 600) -> float:
    """Send a batch and wait for every result (the result backend's pub/sub: no polling CPU taken from workers)."""
    start = time.perf_counter()
    results = [celery_app.send_task("arbor.solve", args=[j], task_id=j) for j in job_ids]
    for r in results:
        r.get(timeout=timeout)
    seconds = time.perf_counter() - start
    assert all(store.get_job(j).status == "done" for j in job_ids)
    return seconds


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--overhead-jobs", type=int, default=40)
    ap.add_argument("--jobs", type=int, default=40, help="jobs per throughput batch")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # the same as each worker process
    root = Path(tempfile.mkdtemp(prefix="arbor-bench-queue-"))
    server = RedisServer(root / "redis", appendonly=False).start()
    workers = []
    try:
        with postgres_database() as db_url:
            from agent.registry import PolicyRegistry
            from agent.store import Store
            from workers.app import app as celery_app
            from workers.cache import PolicyCache
            from agent.jobs import run_job

            home = root / "home"
            seed_policy(home, db_url)
            env = arbor_env(home, db_url, server.url, ARBOR_TRAIN_THRESHOLD=0)
            store = Store(db_url)
            celery_app.conf.broker_url = celery_app.conf.result_backend = server.url
            workers.append(worker("bench1", "search", env, root).wait_ready(180))

            # per-job overhead: in-process baseline, then the queue, alternating so that load drifts hit both
            cache = PolicyCache(PolicyRegistry(home / "policies", store))
            local_ids = _jobs(store, "l", args.overhead_jobs + 3, LIGHT)
            queued_ids = _jobs(store, "q", args.overhead_jobs + 3, LIGHT)
            local, queued = [], []
            for i, (lj, qj) in enumerate(zip(local_ids, queued_ids)):
                t = time.perf_counter()
                run_job(store, lj, cache.get, "bench")
                dt_local = time.perf_counter() - t
                t = time.perf_counter()
                celery_app.send_task("arbor.solve", args=[qj], task_id=qj).get(timeout=60)
                dt_queue = time.perf_counter() - t
                if i >= 3:  # warm-up: first loads, first connections
                    local.append(dt_local)
                    queued.append(dt_queue)
            overhead = sorted(q - l for q, l in zip(queued, local))

            # throughput: 1 worker, then 2
            _drain(celery_app, store, _jobs(store, "w1-", 4, HEAVY))  # warm-up
            load = {"before_one_worker": os.getloadavg()[0]}
            one = _drain(celery_app, store, _jobs(store, "t1-", args.jobs, HEAVY))
            workers.append(worker("bench2", "search", env, root).wait_ready(180))
            _drain(celery_app, store, _jobs(store, "w2-", 4, HEAVY))
            load["before_two_workers"] = os.getloadavg()[0]
            two = _drain(celery_app, store, _jobs(store, "t2-", args.jobs, HEAVY))
            load["after"] = os.getloadavg()[0]
            store.engine.dispose()
    finally:
        for w in workers:
            w.stop(timeout=20)
        server.stop()

    result = {
        "machine": f"{os.cpu_count()} CPU cores, torch threads 1 per process",
        "load_average_1min": load,  # other users of the machine take cores from the workers
        "overhead": {
            "jobs": len(overhead), "search": LIGHT,
            "in_process_median_ms": round(1000 * statistics.median(local), 1),
            "queued_median_ms": round(1000 * statistics.median(queued), 1),
            "overhead_median_ms": round(1000 * statistics.median(overhead), 1),
            "overhead_p90_ms": round(1000 * overhead[int(0.9 * (len(overhead) - 1))], 1),
            "goal_median_ms": 50,
        },
        "throughput": {
            "jobs": args.jobs, "search": HEAVY,
            "one_worker_s": round(one, 2), "two_workers_s": round(two, 2),
            "one_worker_jobs_per_s": round(args.jobs / one, 2), "two_workers_jobs_per_s": round(args.jobs / two, 2),
            "speedup": round(one / two, 2), "goal_speedup": 1.8,
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
