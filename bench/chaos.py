"""Chaos benchmark: jobs through killed workers, restarted Redis and a restarted database, with train cycles killed
mid-save. Real parts: a redis-server started here (append-only file, an ACL user with a password, the default user
off, as compose.yaml runs it), a throwaway PostgreSQL database, two `arbor worker` subprocesses serving every queue,
`arbor beat` (schedule and recovery), the `arbor submit` command; the untrained built-in policy.

    python bench/chaos.py                                   # JSON on stdout
    python bench/chaos.py --jobs 200 --out bench/results/chaos.json

While the jobs drain, a fault every --fault-every seconds, in turn, --faults in all (then the rest drains):
- worker_kill: SIGKILL a whole worker (parent and pool child) that is running a job, and start it again;
- database_restart: pg_terminate_backend on every connection to the database (what a server restart does to
  its clients);
- redis_restart: stop redis-server (SIGTERM: the append-only file is flushed) and start it again;
- train_kill_mid_save: queue a train cycle, SIGKILL its worker while the registry writes the new version (its
  `.tmp-*` folder names a version number: the row is taken, the weights are being written), and start the worker
  again.
Settings are the defaults a deployment runs with (visibility timeout 6 h, lease TTL 60 s, recovery scans every
30 s): a killed worker's job comes back through the beat's recovery, within about two minutes. Only the work is
small: best-of-N with few tokens at temperature 0 (N greedy rows: the candidates agree, so the label-free
selection keeps them and train cycles have labels to save a version from), a 2 s fine-tune (ARBOR_TRAIN_BUDGET_S), a promote
margin of -1 so that cycles promote and workers switch versions mid-run, no threshold-started cycles (the faults
queue them).

At the end, every job must be done exactly once (one result, one set of N candidates, one best row, the result's
best answer equal to the stored best row), nothing queued or running (jobs and train cycles), and the promoted
version must load. Reported: jobs, faults by kind, jobs lost, duplicate effects, stuck jobs, time to drain.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds queue.py: drop this folder from the path so that `import queue` finds the standard library
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from urllib.parse import quote  # noqa: E402

import redis  # noqa: E402

from tests.support import (PG_ADMIN_URL, ArborProcess, RedisServer, arbor, arbor_env, point_celery_app_at,  # noqa: E402
                           postgres_database, seed_policy, wait_for)

KINDS = ("worker_kill", "database_restart", "redis_restart", "train_kill_mid_save")
FINISHED = ("done", "failed")


class Worker:
    """One `arbor worker` on every queue, started again after each kill (a fresh log per start)."""

    def __init__(self, name: str, env: dict, root: Path):
        self.name, self.env, self.root, self.starts = name, env, root, 0
        self.proc: ArborProcess | None = None

    def start(self) -> "Worker":
        self.starts += 1
        self.proc = ArborProcess(["worker", "--queues", "search,train,default", "--name", f"{self.name}@%h",
                                  "--loglevel", "INFO"], self.env, self.root / f"{self.name}-{self.starts}.log").start()
        return self

    def children(self) -> set[int]:
        return set(self.proc.children()) if self.proc and self.proc.proc.poll() is None else set()

    def ready(self) -> bool:
        text = self.proc.text()
        return " ready." in text and "loaded policy" in text


def _retrying(fn, seconds: float = 60):
    """The bench's own store reads, through the database restarts it causes."""
    from agent.jobs import StoreRetry

    return StoreRetry(seconds=seconds, first_wait=0.2, max_wait=2).call(fn)


def _statuses(store, job_ids: list[str]) -> dict[str, str]:
    return _retrying(lambda: store.job_status(job_ids))


def _running_on(store, worker: Worker) -> list[str]:
    host = socket.gethostname()
    children = {f"{host}:{pid}" for pid in worker.children()}
    return [j.id for j in _retrying(lambda: store.running_jobs(("solve", "refine"))) if j.worker in children]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--n", type=int, default=128, help="candidates per job (best-of-N)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--fault-every", type=float, default=8.0, help="seconds between faults")
    ap.add_argument("--faults", type=int, default=16, help="faults in all, the kinds in turn")
    ap.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    load_start = round(os.getloadavg()[0], 2)  # other users of the machine slow the workers down
    root = Path(tempfile.mkdtemp(prefix="arbor-bench-chaos-"))
    password = secrets.token_urlsafe(18)
    server = RedisServer(root / "redis", appendonly=True, password=password).start()
    workers: list[Worker] = []
    beat = None
    faults = {k: 0 for k in KINDS}
    events: list[dict] = []
    try:
        with postgres_database() as db_url:
            from sqlalchemy import create_engine, text

            from agent.registry import PolicyRegistry
            from agent.store import Store
            from tasks import Problem

            home = root / "home"
            seed_policy(home, db_url)
            store = Store(db_url)
            # held-out problems of the submitted problems' task (none named), with answers: train cycles gate on them
            store.add_problems([Problem(f"{i}+{i}=", str(2 * i)[::-1].ljust(2, "0"), split="heldout", id=f"h{i}",
                                        difficulty=1) for i in range(4)])
            env = arbor_env(home, db_url, f"redis://arbor@127.0.0.1:{server.port}/0", ARBOR_REDIS_PASSWORD=password,
                            ARBOR_TRAIN_THRESHOLD=0, ARBOR_TRAIN_BUDGET_S=2, ARBOR_PROMOTE_MARGIN=-1,
                            REMAP_SIGTERM="SIGQUIT")
            celery_app = point_celery_app_at(f"redis://arbor:{quote(password, safe='')}@127.0.0.1:{server.port}/0")
            admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
            broker = redis.Redis(port=server.port, username="arbor", password=password, socket_timeout=5)
            db_name = db_url.rsplit("/", 1)[1]
            policies = home / "policies"

            workers = [Worker("w1", env, root).start(), Worker("w2", env, root).start()]
            beat = ArborProcess(["beat", "--loglevel", "INFO", "--schedule", str(root / "celerybeat-schedule")], env,
                                root / "beat.log").start()
            for w in workers:
                w.proc.wait_ready(180)

            problems = root / "problems.jsonl"
            problems.write_text("".join(json.dumps({"prompt": f"{i % 90 + 10}+{(7 * i) % 90 + 10}=", "id": f"c{i}"}) + "\n"
                                        for i in range(args.jobs)))
            start = time.monotonic()
            out = arbor("submit", str(problems), "--strategy", "best_of_n", "--n", str(args.n), "--temperature",
                        str(args.temperature), "--max-new-tokens", str(args.max_new_tokens), env=env, timeout=300)
            assert out.returncode == 0, out.stderr
            job_ids = out.stdout.split()
            assert len(job_ids) == args.jobs
            train_ids: list[str] = []

            def finished() -> int:
                return sum(s in FINISHED for s in _statuses(store, job_ids).values())

            def restart(w: Worker) -> None:
                w.proc.kill()
                w.start()

            def worker_kill(w: Worker) -> dict:
                if not w.ready():
                    w.proc.wait_ready(180)
                busy = wait_for(lambda: _running_on(store, w) or None, 30, f"a job running on {w.name}", interval=0.05)
                restart(w)
                return {"worker": w.name, "jobs_running": busy, "killed_at": time.time()}

            def database_restart() -> dict:
                with admin.connect() as c:
                    n = c.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                       "WHERE datname = :db AND pid <> pg_backend_pid()"), {"db": db_name}).scalar()
                return {"connections_terminated": n}

            def redis_restart() -> dict:
                server.stop()
                down = time.monotonic()
                time.sleep(1.0)
                server.start()
                return {"down_s": round(time.monotonic() - down, 2)}

            def train_kill_mid_save() -> dict:
                for w in workers:
                    if not w.ready():
                        w.proc.wait_ready(180)
                # a killed cycle holds the train lock until its TTL runs out: a cycle queued before then is skipped
                wait_for(lambda: not broker.exists("arbor:lock:train"), 120, "the train lock to be free", interval=0.5)
                tid = uuid.uuid4().hex
                train_ids.append(tid)
                celery_app.send_task("arbor.train_cycle", task_id=tid)
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:  # a save lasts tens of milliseconds: poll tightly
                    for tmp in policies.glob(".tmp-*"):
                        try:
                            owner = json.loads((tmp / ".arbor_owner.json").read_text())
                        except (OSError, ValueError):
                            continue
                        w = next((w for w in workers if owner.get("pid") in w.children()), None)
                        if w is not None and owner.get("version"):  # numbered: the weights are being written
                            restart(w)
                            return {"worker": w.name, "cycle": tid, "killed_mid_save": True, "version": owner.get("version")}
                    job = store.get_job(tid) if int(time.monotonic() * 50) % 25 == 0 else None
                    if job is not None and job.status in FINISHED:
                        return {"cycle": tid, "killed_mid_save": False, "result": job.result}
                    time.sleep(0.002)
                return {"cycle": tid, "killed_mid_save": False, "result": "not finished in 120 s"}

            turn = itertools.cycle(KINDS)
            victims = itertools.cycle(workers)
            drained_at = None
            next_fault = time.monotonic() + args.fault_every
            while time.monotonic() - start < args.timeout:
                done = finished()
                if done == len(job_ids):
                    drained_at = time.monotonic()
                    break
                if time.monotonic() < next_fault or sum(faults.values()) >= args.faults:
                    time.sleep(0.5)
                    continue
                kind = next(turn)
                at = round(time.monotonic() - start, 1)
                try:
                    if kind == "worker_kill":
                        detail = worker_kill(next(victims))
                    elif kind == "database_restart":
                        detail = database_restart()
                    elif kind == "redis_restart":
                        detail = redis_restart()
                    else:
                        detail = train_kill_mid_save()
                except TimeoutError as exc:  # e.g. no job left running on that worker
                    events.append({"at_s": at, "kind": kind, "skipped": str(exc), "jobs_done": done})
                    next_fault = time.monotonic() + args.fault_every
                    continue
                if kind != "train_kill_mid_save" or detail["killed_mid_save"]:
                    faults[kind] += 1
                events.append({"at_s": at, "kind": kind, "jobs_done": done, **detail})
                print(json.dumps(events[-1]), file=sys.stderr, flush=True)
                next_fault = time.monotonic() + args.fault_every
            drain_s = None if drained_at is None else drained_at - start

            # settle: killed train cycles come back through recovery too; then nothing may be queued or running
            def settled():
                rows = _retrying(lambda: store.list_jobs())
                return all(r.status in FINISHED for r in rows)
            try:
                wait_for(settled, 300, "every job and train cycle to finish", interval=1.0)
            except TimeoutError:
                pass
            settle_s = time.monotonic() - start

            # verdicts
            rows = {r.id: r for r in store.list_jobs()}
            jobs = [rows[j] for j in job_ids]
            lost = [j.id for j in jobs if j.status != "done"]
            stuck = [r.id for r in rows.values() if r.status not in FINISHED]
            duplicates, wrong_best = [], []
            for j in jobs:
                trajectories = store.trajectories(job_id=j.id)
                best = [t for t in trajectories if t.is_best]
                if j.status == "done" and (len(trajectories) != args.n or len(best) != 1):
                    duplicates.append({"job": j.id, "trajectories": len(trajectories), "best_rows": len(best)})
                elif j.status == "done" and j.result["best"]["completion"] != best[0].completion:
                    wrong_best.append(j.id)
            registry = PolicyRegistry(policies, store)
            promoted = registry.promoted()
            loaded = registry.load(device="cpu").version
            versions: dict[str, int] = {}
            for r in store.policies():
                versions[r.status] = versions.get(r.status, 0) + 1
            train_rows = [rows[t] for t in rows if rows[t].kind == "train"]
            logs = [p.read_text(errors="replace") for p in root.glob("*.log")]
            beat_log = (root / "beat.log").read_text(errors="replace")
            attempts = [j.attempts for j in jobs]
            # a killed worker's job: seconds from the kill to its result (the beat's recovery under default settings)
            # (its message then waits behind the queued jobs: done-after includes that wait)
            resent: dict[str, float] = {}
            for line in beat_log.splitlines():
                found = re.match(r"\[(\S+ \S+): WARNING/MainProcess\] job (\w+) was running on .* sent again", line)
                if found:
                    at = dt.datetime.strptime(found[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                    resent.setdefault(found[2], at)
            killed = [(j, e["killed_at"]) for e in events if e["kind"] == "worker_kill" for j in e.get("jobs_running", [])
                      if rows[j].attempts > 1]  # a job that finished before the kill landed was not killed
            recovered = [rows[j].finished_at.timestamp() - at for j, at in killed if rows[j].finished_at is not None]
            resend = [resent[j] - at for j, at in killed if j in resent]
            result = {
                "machine": f"{os.cpu_count()} CPU cores, torch threads 1 per worker process",
                "command": "python bench/chaos.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "jobs": len(job_ids),
                "search": {"strategy": "best_of_n", "n": args.n, "temperature": args.temperature,
                           "max_new_tokens": args.max_new_tokens},
                "settings": {"visibility_timeout_s": 6 * 3600, "lease_ttl_s": 60, "recover_every_s": 30,
                             "train_budget_s": 2, "fault_every_s": args.fault_every},
                "faults": faults,
                "faults_total": sum(faults.values()),
                "jobs_lost": len(lost),
                "duplicate_effects": len(duplicates),
                "wrong_best_answers": len(wrong_best),
                "stuck_jobs": len(stuck),
                "time_to_drain_s": None if drain_s is None else round(drain_s, 1),
                "last_fault_at_s": max((e["at_s"] for e in events), default=None),
                "time_to_settle_s": round(settle_s, 1),
                "jobs_delivered_more_than_once": sum(a > 1 for a in attempts),
                "max_deliveries_of_a_job": max(attempts),
                "recovery_resends_by_beat": beat_log.count("sent again (delivery"),
                "killed_worker_job_sent_again_after_s": {"count": len(resend),
                                                         "max": round(max(resend), 1) if resend else None,
                                                         "median": round(sorted(resend)[len(resend) // 2], 1)
                                                         if resend else None},
                "killed_worker_job_done_after_s": {"count": len(recovered),
                                                   "max": round(max(recovered), 1) if recovered else None,
                                                   "median": round(sorted(recovered)[len(recovered) // 2], 1)
                                                   if recovered else None},
                "load_average_1min": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
                "train_cycles": {"queued": len(train_ids), "finished": sum(r.status in FINISHED for r in train_rows),
                                 "delivered_more_than_once": sum(r.attempts > 1 for r in train_rows),
                                 "promoted": sum(bool((r.result or {}).get("promoted")) for r in train_rows)},
                "policy_versions": versions,
                "promoted_version": promoted[0] if promoted else None,
                "promoted_version_loads": loaded == (promoted[0] if promoted else None),
                "temporary_folders_left": len(list(policies.glob(".tmp-*"))),
                "password_in_logs": any(password in text or quote(password, safe="") in text for text in logs),
                "events": events,
                "details": {"lost": lost[:20], "stuck": stuck[:20], "duplicates": duplicates[:20], "wrong_best": wrong_best[:20]},
            }
            store.engine.dispose()
            admin.dispose()
    finally:
        for w in workers:
            if w.proc is not None:
                w.proc.stop(timeout=20)
        if beat is not None:
            beat.stop(timeout=10)
        server.stop()
    text_out = json.dumps(result, indent=2)
    print(text_out)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text_out + "\n")
    shutil.rmtree(root, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
