"""Which FAISS index holds the context memory's block representatives: retrieval latency and recall against
exact search, by number of blocks, for flat inner product and approximate indices.

    python -m bench.faiss_index          # ~3 min on a 2-core CPU; JSON on the last line, bench/results/faiss_index.json

Data: unit-norm representatives drawn around 64 cluster centres (blocks of similar text look alike); each query
is a stored representative plus noise, as a span's mean query resembles the block it attends to. Searches are
one query at a time with top-k = 16 (InfLLM's retrieved blocks), one thread, as the decoder runs them. Dimensions:
64 (the passkey benchmark's model: 2 heads x 32) and 4096 (a 7B Llama: 32 heads x 128). Recall@16 is the share
of the exact top 16 (flat search) that an index returns. `add_us` is the cost of adding one block, which the
memory pays every block_size tokens per layer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import faiss
import numpy as np

RESULTS = Path(__file__).parent / "results"
TOPK = 16


def make_data(n: int, dim: int, queries: int, rng: np.random.Generator):
    centres = rng.standard_normal((64, dim)).astype(np.float32)
    x = centres[rng.integers(0, 64, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.integers(0, n, queries)] + 0.3 * rng.standard_normal((queries, dim)).astype(np.float32) / np.sqrt(dim) * 8
    return x, q.astype(np.float32)


def build(kind: str, dim: int, x: np.ndarray):
    if kind == "flat_ip":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw32":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction, index.hnsw.efSearch = 64, 64
    elif kind == "ivf_flat":
        nlist = max(4, int(np.sqrt(len(x))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x)  # needs the data up front: a growing memory would have to retrain as blocks arrive
        index.nprobe = 8
    else:
        raise ValueError(kind)
    start = time.perf_counter()
    index.add(x)
    return index, (time.perf_counter() - start) / len(x) * 1e6


def measure(index, q: np.ndarray) -> tuple[float, np.ndarray]:
    times, found = [], []
    for row in q:
        t = time.perf_counter()
        _, ids = index.search(row[None], TOPK)
        times.append(time.perf_counter() - t)
        found.append(ids[0])
    return float(np.median(times) * 1e6), np.array(found)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--out", type=Path, default=RESULTS / "faiss_index.json")
    args = p.parse_args(argv)
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    rows = []
    for dim, sizes in ((64, (256, 1024, 4096, 16384)), (4096, (256, 1024, 4096))):
        for n in sizes:
            x, q = make_data(n, dim, args.queries, rng)
            exact = None
            for kind in ("flat_ip", "hnsw32", "ivf_flat"):
                index, add_us = build(kind, dim, x)
                us, found = measure(index, q)
                if exact is None:
                    exact = found
                recall = float(np.mean([len(set(a) & set(b)) / TOPK for a, b in zip(found, exact)]))
                row = {"dim": dim, "blocks": n, "index": kind, "search_us": round(us, 1), "recall_at_16": round(recall, 4),
                       "add_us": round(add_us, 2)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {"topk": TOPK, "queries": args.queries, "threads": 1, "faiss": faiss.__version__, "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
