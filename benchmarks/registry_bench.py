"""Registry benchmark: publish time and reference-resolution time at 10, 100 and 1,000 versions, per store.

    .venv/bin/python benchmarks/registry_bench.py                 # both stores; 10, 100, 1000 versions
    .venv/bin/python benchmarks/registry_bench.py --stores local --sizes 10 100 --rank 16 --resolves 2000
    .venv/bin/python benchmarks/registry_bench.py --stores mlflow --mlflow-uri mlflow+http://HOST:PORT

Each size gets a fresh local store in a temporary folder and, for the MLflow store, a fresh adapter name on one
`mlflow server` (started here on a free port with a sqlite backend and a local artifact root, unless
--mlflow-uri names one), read through a fresh local cache: resolution is timed with the cache warm (every
version downloaded once before timing), as a serving machine sees it. Publishing uses one small synthetic PEFT adapter
(rank 8 on q_proj/v_proj of the tiny Llama, two layers: ~15 KB) so the figures measure the registry (validation,
copy + sha256, fsync, lock, rename) rather than the disk's bandwidth. Resolution is timed per call for the three
reference kinds, `NAME` (latest), `NAME@N` (a random existing version) and `NAME@prod`, as the vLLM server's
resolver calls it: warm page cache, one Registry object.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

from registry import open_registry  # noqa: E402
from tests.synthetic_lora import write_lora  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def bench_size(store: str, n: int, rank: int, resolves: int, mlflow_uri: str | None, seed: int = 0) -> dict:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="registry-bench-") as tmp:
        lora = write_lora(Path(tmp) / "lora", rank=rank, alpha=2 * rank)
        if store == "local":
            reg, name = open_registry(str(Path(tmp) / "store"), mirror_mlflow=False), "bench"
        else:
            reg, name = open_registry(mlflow_uri, cache_dir=Path(tmp) / "cache"), f"bench-{n}-{os.getpid()}"
        publish_ms = []
        for _ in tqdm(range(n), desc=f"{store}: publish x{n}", leave=False):
            t0 = time.perf_counter()
            reg.publish(lora, name, tags={"bench": "1"}, lineage={"run_id": "bench"})
            publish_ms.append((time.perf_counter() - t0) * 1e3)
        reg.set_alias(name, "prod", rng.randint(1, n))
        for av in tqdm(reg.list_versions(name), desc=f"{store}: warm the cache", leave=False):
            av.path  # noqa: B018 - the local store: a no-op; the server: download once into the cache
        timings = {}
        for kind in ("latest", "version", "alias"):
            samples = []
            for _ in range(resolves):
                ref = {"latest": name, "version": f"{name}@{rng.randint(1, n)}", "alias": f"{name}@prod"}[kind]
                t0 = time.perf_counter()
                reg.resolve(ref).path  # noqa: B018 - the folder a server would load
                samples.append((time.perf_counter() - t0) * 1e3)
            timings[kind] = samples
        t0 = time.perf_counter()  # re-hash every version of this adapter where the store keeps it
        versions = reg.list_versions(name)
        problems = [p for av in versions for p in reg.store.verify_version(av.ref, name, av.version)]
        verify_s = time.perf_counter() - t0
        assert not problems and len(versions) == n, problems[:3]
    return {"store": store, "n": n, "publish": publish_ms, "resolve": timings, "verify_s": verify_s}


@contextlib.contextmanager
def mlflow_server(uri: str | None):
    """The server to benchmark against: `uri`, or one started here (tests/mlflow_server.py) and stopped after."""
    if uri:
        yield uri
        return
    from tests.mlflow_server import MlflowServerProcess

    with tempfile.TemporaryDirectory(prefix="registry-bench-server-") as tmp:
        server = MlflowServerProcess(Path(tmp)).start()
        try:
            yield server.uri
        finally:
            server.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stores", nargs="+", choices=["local", "mlflow"], default=["local", "mlflow"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--resolves", type=int, default=500, help="timed resolutions per reference kind")
    ap.add_argument("--mlflow-uri", default=None, help="an MLflow server to use (default: start one here)")
    args = ap.parse_args(argv)

    rows = []

    def measured(row: dict) -> None:  # printed as it comes, so a long run's early rows survive an interruption
        rows.append(row)
        print(f"measured {row['store']} x{row['n']}: publish median {statistics.median(row['publish']):.2f} ms, "
              f"resolve p99 {max(percentile(v, 0.99) for v in row['resolve'].values()):.3f} ms", flush=True)

    if "local" in args.stores:
        for n in args.sizes:
            measured(bench_size("local", n, args.rank, args.resolves, None))
    if "mlflow" in args.stores:
        with mlflow_server(args.mlflow_uri) as uri:
            for n in args.sizes:
                measured(bench_size("mlflow", n, args.rank, args.resolves, uri))
    print(f"{'store':>6} | {'versions':>8} | {'publish ms (median / p95)':>26} | {'resolve NAME ms':>16} | "
          f"{'resolve NAME@N ms':>18} | {'resolve NAME@prod ms':>21} | {'verify all s':>12}")
    print(f"{'':>6} | {'':>8} | {'':>26} | {'(median / p99)':>16} | {'(median / p99)':>18} | {'(median / p99)':>21} |")
    worst = {"local": 0.0, "mlflow": 0.0}
    for r in rows:
        res = r["resolve"]
        cells = []
        for kind in ("latest", "version", "alias"):
            cells.append(f"{statistics.median(res[kind]):.3f} / {percentile(res[kind], 0.99):.3f}")
            worst[r["store"]] = max(worst[r["store"]], percentile(res[kind], 0.99))
        print(f"{r['store']:>6} | {r['n']:>8} | {statistics.median(r['publish']):>11.2f} / "
              f"{percentile(r['publish'], 0.95):>12.2f} | {cells[0]:>16} | {cells[1]:>18} | {cells[2]:>21} | "
              f"{r['verify_s']:>12.2f}")
    targets = {"local": 20.0, "mlflow": 50.0}
    ok = True
    for store in args.stores:
        met = worst[store] < targets[store]
        ok &= met
        print(f"{store}: worst p99 resolution {worst[store]:.3f} ms (target < {targets[store]:.0f} ms): "
              f"{'OK' if met else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
