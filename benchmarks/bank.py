"""Speed and scale of the storage layer (a script, not a test).

    python benchmarks/bank.py --sizes 10000,100000          # quick
    python benchmarks/bank.py --sizes 10000,100000,1000000  # the 1M goal (HNSW build takes minutes)
    python benchmarks/bank.py --sizes "" --skip-catalog --scale 1000000,10000000  # IVF-PQ, memory-mapped

Retrieval: our index (at the kind its threshold picks) against numpy brute force
and exact FAISS, on clustered data of low intrinsic dimension (what real task
embeddings look like, and what makes recall meaningful). Catalog: ``add``
throughput on SQLite and ``list`` with a filter returning 50 of 100k versions.

Scale (``--scale``): the IVF-PQ kind on synthetic vectors (the same mixture of
Gaussians, d=64 by default), built in this process, saved, then opened
memory-mapped in a fresh process that measures resident memory, one-query
latency on one thread and recall@5 against exact search (ground truth by
chunked brute force) for several ``nprobe``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.index import IndexParams, VectorIndex, normalize, pack_ids, threads_for  # noqa: E402

ROWS: list[tuple[str, str, str, str, str]] = []  # (section, what, value, goal, met)


def row(section: str, what: str, value: str, goal: str = "", met: bool | None = None) -> None:
    ROWS.append((section, what, value, goal, "" if met is None else ("yes" if met else "NO")))
    print(f"  {section:<14} {what:<44} {value:>22}  {goal} {ROWS[-1][4]}", flush=True)


def clustered(n: int, d: int, seed: int, n_clusters: int = 1000, latent: int = 32) -> np.ndarray:
    """Mixture of Gaussians in a ``latent``-d subspace plus a little isotropic noise."""
    rng = np.random.default_rng(1234)  # same clusters and projection for data and queries
    centres = rng.normal(size=(n_clusters, latent)).astype(np.float32)
    proj = rng.normal(size=(latent, d)).astype(np.float32) / np.sqrt(latent)
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    for lo in range(0, n, 100_000):
        m = min(100_000, n - lo)
        z = centres[rng.integers(0, n_clusters, m)] + 0.35 * rng.normal(size=(m, latent))
        x = z.astype(np.float32) @ proj + 0.02 * rng.normal(size=(m, d)).astype(np.float32)
        out[lo : lo + m] = normalize(x)
    return out


def latencies(fn, queries: np.ndarray) -> tuple[float, float]:
    times = []
    for q in queries:
        t = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - t)
    ms = np.array(times) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def qps(fn, batch: np.ndarray) -> float:
    t = time.perf_counter()
    fn(batch)
    return len(batch) / (time.perf_counter() - t)


def numpy_topk(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    q = q.reshape(-1, x.shape[1])
    out = np.empty((len(q), k), np.int64)
    for lo in range(0, len(q), 64):
        s = q[lo : lo + 64] @ x.T
        part = np.argpartition(-s, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, part, 1), axis=1)
        out[lo : lo + 64] = np.take_along_axis(part, order, 1)
    return out


def bench_retrieval(n: int, d: int, args: argparse.Namespace) -> None:
    sec = f"retrieve {n // 1000}k"
    print(f"\n== retrieval, n={n:,}, d={d}", flush=True)
    t = time.perf_counter()
    x = clustered(n, d, seed=0)
    print(f"  data generated in {time.perf_counter() - t:.1f}s", flush=True)
    single = clustered(args.queries, d, seed=1)
    batch = clustered(args.batch, d, seed=2)
    k = 5

    exact = faiss.IndexFlatIP(d)
    exact.add(x)
    truth = exact.search(single, k)[1]

    params = IndexParams(
        threshold=args.threshold,
        hnsw_m=args.m,
        ef_construction=args.ef_construction,
        ef_search=args.ef_search,
    )
    t = time.perf_counter()
    ours = VectorIndex.build(d, pack_ids(np.arange(n) + 1, np.zeros(n, np.int64)), x, params)
    build = time.perf_counter() - t
    row(sec, f"ours: build ({ours.kind}, {faiss.omp_get_max_threads()} threads)", f"{build:.1f} s")

    def ours_one(q):
        return ours.search(q[None], k)

    def exact_one(q):
        with threads_for(1):
            return exact.search(q[None], k)

    n_np = min(len(single), 50 if n >= 500_000 else 200)
    o50, o99 = latencies(ours_one, single)
    e50, e99 = latencies(exact_one, single)
    n50, n99 = latencies(lambda q: numpy_topk(x, q, k), single[:n_np])
    got = np.array([[v - 1 for v, _ in ours_one(q)[0]] for q in single])
    recall = np.mean([len(set(g) & set(t_)) / k for g, t_ in zip(got, truth, strict=True)])
    goal_ok = o50 <= 2.0 and recall >= 0.95
    row(
        sec,
        "one query p50 / p99 ms: ours",
        f"{o50:.3f} / {o99:.3f}",
        "p50<=2ms & R@5>=.95" if n >= 1_000_000 else "",
        goal_ok if n >= 1_000_000 else None,
    )
    row(sec, "one query p50 / p99 ms: faiss exact", f"{e50:.3f} / {e99:.3f}")
    row(sec, "one query p50 / p99 ms: numpy brute", f"{n50:.3f} / {n99:.3f}")
    row(sec, "one query p50 speed-up vs exact / numpy", f"{e50 / o50:.1f}x / {n50 / o50:.1f}x")
    row(sec, "recall@5 of ours vs exact", f"{recall:.4f}", ">=0.95", recall >= 0.95)
    if ours.kind == "hnsw":  # one build, several efSearch settings: the recall/latency knob
        for ef in (32, 64, 128, 256):
            ours._inner.hnsw.efSearch = ef
            p50, _ = latencies(ours_one, single[:200])
            hits = [[v - 1 for v, _ in ours_one(q)[0]] for q in single[:200]]
            rec = np.mean([len(set(g) & set(t_)) / k for g, t_ in zip(hits, truth, strict=False)])
            row(sec, f"  efSearch={ef}: p50 ms / recall@5", f"{p50:.3f} / {rec:.4f}")
        ours._inner.hnsw.efSearch = params.ef_search
    bq = {
        "ours": qps(lambda b: ours.search(b, k), batch),
        "faiss exact": qps(lambda b: exact.search(b, k), batch),
        "numpy brute": qps(lambda b: numpy_topk(x, b, k), batch[: max(64, len(batch) // 4)]),
    }
    row(
        sec,
        f"batch QPS (batch {len(batch)}): ours / exact / numpy",
        " / ".join(f"{v:,.0f}" for v in bq.values()),
    )


def bench_add(n: int, d: int) -> None:
    from storage import Library

    print(f"\n== catalog add, {n} small versions", flush=True)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        lib = Library.open(tmp)
        vecs = rng.normal(size=(n, d)).astype(np.float32)
        t = time.perf_counter()
        for i in range(n):
            lib.add_version(
                f"skill-{i % 50}",
                os.urandom(2048),
                ranks={"qkv": 8},
                targets=["qkv"],
                base={"arch": "vit"},
                learner="lora",
                tags={"i": str(i)},
                embeddings={"examples": vecs[i]},
            )
        rate = n / (time.perf_counter() - t)
        row(
            "catalog",
            "add() per second (2 KiB blob + 1 vector)",
            f"{rate:,.0f} /s",
            ">=100/s",
            rate >= 100,
        )
        lib.retrieve(vecs[0])
        p50, p99 = latencies(lambda q: lib.retrieve(q, k=5), vecs[:200])
        row("catalog", f"Library.retrieve p50 / p99 ms ({n} versions)", f"{p50:.3f} / {p99:.3f}")
        lib.close()


def bench_list(n_versions: int) -> None:
    from sqlalchemy import insert

    from storage import Catalog
    from storage.models import SkillRow, TagRow, VersionRow

    print(f"\n== catalog list, {n_versions:,} versions", flush=True)
    per, groups = 5, n_versions // 5 // 50
    n_skills = n_versions // per
    with tempfile.TemporaryDirectory() as tmp:
        cat = Catalog.open(tmp)
        t0 = time.perf_counter()
        now = datetime.now(timezone.utc)
        with cat.engine.begin() as conn:
            conn.execute(
                insert(SkillRow),
                [
                    {"id": s + 1, "name": f"skill-{s:06d}", "last_version": per, "created": now}
                    for s in range(n_skills)
                ],
            )
            versions, tags = [], []
            for s in range(n_skills):
                for v in range(1, per + 1):
                    vid = s * per + v
                    versions.append(
                        {
                            "id": vid,
                            "skill_id": s + 1,
                            "version": v,
                            "digest": f"{vid:064x}",
                            "size": 1000,
                            "ranks": {"qkv": 8},
                            "targets": ["qkv"],
                            "base": {"arch": "vit"},
                            "base_id": "b" * 16,
                            "learner": ["lora", "psec", "vida"][vid % 3],
                            "config": {},
                            "metrics": {"acc": 0.9},
                            "description": f"task {vid}",
                            "spaces": [],
                            "created": now + timedelta(seconds=vid),
                        }
                    )
                    group = f"g{s % groups}" if v == per else f"old{vid % 7}"
                    tags.append({"version_id": vid, "key": "group", "value": group})
            conn.execute(insert(VersionRow), versions)
            conn.execute(insert(TagRow), tags)
        row(
            "catalog",
            f"bulk-load {n_versions:,} versions (setup)",
            f"{time.perf_counter() - t0:.1f} s",
        )
        cases = {
            "list(tags=group) -> 50 latest": dict(tags={"group": "g17"}),
            "list(learner, latest_only=False, limit=50)": dict(
                learner="psec", latest_only=False, limit=50
            ),
            "list(name='skill-0001*') -> 50": dict(name="skill-0001*", limit=50),
        }
        for label, kw in cases.items():
            got = cat.list(**kw)
            times = []
            for _ in range(20):
                t = time.perf_counter()
                cat.list(**kw)
                times.append(time.perf_counter() - t)
            ms = float(np.median(times)) * 1e3
            row("catalog", f"{label} [{len(got)} rows] ms", f"{ms:.1f}", "<=50ms", ms <= 50)
        cat.close()


def bench_skill_add(n: int) -> None:
    """SkillBank.add with real small skills (a rank-4 LoRA on a 2-layer MLP, ~3 KiB files)."""
    import torch

    import skillbank as sb

    print(f"\n== SkillBank.add, {n} small skills", flush=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    sb.add_adapter(model, "s", sb.LoRAConfig(rank=4, targets=["0", "2"]))
    skills = []
    for _ in range(16):
        for layer in sb.adapter_layers(model):
            torch.nn.init.normal_(layer.lora_B["s"], std=0.1)
        skills.append(sb.Skill.from_model(model, "s"))
    vecs = np.random.default_rng(0).normal(size=(n, 64)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp, sb.SkillBank.open(tmp) as bank:
        t = time.perf_counter()
        for i in range(n):
            bank.add(
                f"skill-{i % 50}",
                skills[i % 16],
                embedding=vecs[i],
                tags={"i": str(i)},
                embed_text=False,
            )
        rate = n / (time.perf_counter() - t)
        size = len(skills[0].to_bytes())
    row(
        "catalog",
        f"SkillBank.add() per second (real skills, {size} B)",
        f"{rate:,.0f} /s",
        ">=100/s",
        rate >= 100,
    )


def load_avg() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def exact_topk(x: np.ndarray, q: np.ndarray, k: int, chunk: int = 1_000_000) -> np.ndarray:
    """Exact top-k inner product over ``x`` in row chunks (positions into ``x``)."""
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for lo in range(0, len(x), chunk):
        flat = faiss.IndexFlatIP(x.shape[1])
        flat.add(x[lo : lo + chunk])
        s, i = flat.search(q, k)
        best_s, best_i = np.hstack([best_s, s]), np.hstack([best_i, i + lo])
        order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
    return best_i


def bench_scale(n: int, d: int, args: argparse.Namespace) -> None:
    """IVF-PQ at ``n`` synthetic vectors: build here, measure in a fresh process (mmap)."""
    sec = f"ivfpq {n / 1e6:g}M"
    print(
        f"\n== IVF-PQ scale, n={n:,}, d={d} (synthetic mixture of Gaussians), load {load_avg()}",
        flush=True,
    )
    row(sec, "load average at start (1/5/15 min)", load_avg())
    t = time.perf_counter()
    x = clustered(n, d, seed=0)
    queries = clustered(args.scale_queries, d, seed=1)
    print(f"  data generated in {time.perf_counter() - t:.1f}s", flush=True)
    t = time.perf_counter()
    truth = exact_topk(x, queries, 5)
    row(
        sec,
        f"exact ground truth, {len(queries)} queries (chunked)",
        f"{time.perf_counter() - t:.1f} s",
    )
    exact = faiss.IndexFlatIP(d)
    exact.add(x[: min(n, 1_000_000)])
    with threads_for(1):
        e50, _ = latencies(lambda q: exact.search(q[None], 5), queries[:20])
    exact.reset()
    row(
        sec,
        "exact FAISS one query p50 ms (1 thread)",
        f"{e50 * n / min(n, 1_000_000):.1f}",
        "measured on 1M, scaled" if n > 1_000_000 else "",
    )
    params = IndexParams(
        kind="ivfpq",
        nlist=args.nlist,
        pq_m=args.pq_m,
        nprobe=args.nprobe,
        rerank=args.rerank,
        train_per_list=args.train_per_list,
    )
    t = time.perf_counter()
    idx = VectorIndex.build(d, pack_ids(np.arange(n) + 1, np.zeros(n, np.int64)), x, params)
    build = time.perf_counter() - t
    nlist, m = idx.nlist, int(idx.base.pq.M)
    n_train = min(n, params.train_per_list * nlist)
    row(
        sec,
        f"build: train {n_train:,} + add ({faiss.omp_get_max_threads()} threads)",
        f"{build:.1f} s",
    )
    row(sec, "settings: nlist / pq m (bytes) / nbits", f"{nlist} / {m} / {params.nbits}")
    home = Path(args.scale_dir or tempfile.mkdtemp(prefix="skillbank-scale-")) / f"n{n}"
    shutil.rmtree(home, ignore_errors=True)
    t = time.perf_counter()
    idx.save(home, "examples", {"uid": "bench", "generation": n})
    row(sec, "save (write + fsync, then map)", f"{time.perf_counter() - t:.1f} s")
    sizes = idx.base_bytes(home, "examples")
    row(
        sec,
        "disk: IVF-PQ lists (codes+ids) / ids / vectors",
        " / ".join(
            f"{sizes[f] / 2**20:,.0f} MiB" for f in ("index.faiss", "ids.npy", "vectors.npy")
        ),
    )
    del idx, x
    np.save(home / "queries.npy", queries)
    np.save(home / "truth.npy", truth)
    cmd = [sys.executable, __file__, "--probe", str(home), "--nprobes", args.nprobes]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"probe failed:\n{done.stderr[-3000:]}")
    res = json.loads(done.stdout.strip().splitlines()[-1])
    row(sec, "fresh process, files out of page cache: open ms", f"{res['open_ms']:.1f}")
    row(
        sec,
        "  then first 50 queries (cold) p50 / p99 ms",
        f"{res['cold'][0]:.3f} / {res['cold'][1]:.3f}",
    )
    row(
        sec,
        "resident after open: anon / file-backed MiB",
        f"{res['open_anon']:.0f} / {res['open_file']:.0f}",
    )
    row(sec, "resident after the warm-up: file-backed MiB", f"{res['warm_file']:.0f}")
    row(
        sec, "resident after all queries: anon / file MiB", f"{res['anon']:.0f} / {res['file']:.0f}"
    )
    for r in res["runs"]:
        goal = r["nprobe"] == args.nprobe and r["rerank"] == args.rerank
        row(
            sec,
            f"nprobe={r['nprobe']} rerank={r['rerank']}: p50 / p99 ms, R@5 (file MiB)",
            f"{r['p50']:.3f} / {r['p99']:.3f}, {r['recall']:.4f} ({r['file']:.0f})",
            "R@5>=0.9" if goal else "",
            (r["recall"] >= 0.9) if goal else None,
        )
    row(sec, "load average at end (1/5/15 min)", load_avg())
    if not args.scale_dir:
        shutil.rmtree(home.parent, ignore_errors=True)


def rss_mib() -> tuple[float, float]:
    """(anonymous, file-backed) resident MiB of this process."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return (int(fields["RssAnon"].split()[0]) / 1024, int(fields["RssFile"].split()[0]) / 1024)


def probe(home: Path, nprobes: list[int]) -> None:
    """In a fresh process: open the saved index memory-mapped, time and score it."""
    queries, truth = np.load(home / "queries.npy"), np.load(home / "truth.npy")
    for f in [*home.glob("examples.ivfpq-*/*"), home / "examples.delta.faiss"]:
        fd = os.open(f, os.O_RDONLY)  # drop only our files from the page cache: a cold open
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    anon0, file0 = rss_mib()
    t = time.perf_counter()
    idx, _ = VectorIndex.load(home, "examples")
    open_ms = (time.perf_counter() - t) * 1e3
    anon1, file1 = rss_mib()
    cold = latencies(lambda q: idx.search(q[None], 5), queries[-50:])  # pages come from disk
    runs = []
    default = idx.params
    idx.params = dataclasses.replace(default, nprobe=max(nprobes))
    for q in queries:  # warm: page in what the timed queries touch (the widest setting covers all)
        idx.search(q[None], 5)
    warm_file = rss_mib()[1] - file0
    settings = [(p, default.rerank) for p in nprobes] + [(default.nprobe, 0)]
    for nprobe, rerank in settings:
        idx.params = dataclasses.replace(default, nprobe=nprobe, rerank=rerank)
        for q in queries:  # warm up: a small nprobe re-ranks other (worse) rows, page them in too
            idx.search(q[None], 5)
        p50, p99 = latencies(lambda q: idx.search(q[None], 5), queries)
        got = [[v - 1 for v, _ in idx.search(q[None], 5)[0]] for q in queries]
        rec = float(
            np.mean([len(set(g) & set(t_.tolist())) / 5 for g, t_ in zip(got, truth, strict=True)])
        )
        runs.append(
            {
                "nprobe": nprobe,
                "rerank": rerank,
                "p50": p50,
                "p99": p99,
                "recall": rec,
                "file": rss_mib()[1] - file0,
            }
        )
    anon2, file2 = rss_mib()
    print(
        json.dumps(
            {
                "open_ms": open_ms,
                "open_anon": anon1 - anon0,
                "open_file": file1 - file0,
                "cold": cold,
                "warm_file": warm_file,
                "anon": anon2 - anon0,
                "file": file2 - file0,
                "runs": runs,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000", help="comma-separated index sizes")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=500, help="single queries timed")
    ap.add_argument("--batch", type=int, default=2000, help="batch size for QPS")
    ap.add_argument("--threshold", type=int, default=IndexParams().threshold)
    ap.add_argument("--m", type=int, default=IndexParams().hnsw_m)
    ap.add_argument("--ef-construction", type=int, default=IndexParams().ef_construction)
    ap.add_argument("--ef-search", type=int, default=IndexParams().ef_search)
    ap.add_argument("--adds", type=int, default=500)
    ap.add_argument("--list-versions", type=int, default=100_000)
    ap.add_argument("--skip-catalog", action="store_true")
    ap.add_argument(
        "--scale", default="", help="comma-separated IVF-PQ sizes, e.g. 1000000,10000000"
    )
    ap.add_argument("--scale-dim", type=int, default=64)
    ap.add_argument("--scale-queries", type=int, default=200)
    ap.add_argument("--scale-dir", default=None, help="keep the built indexes here")
    ap.add_argument(
        "--nlist", type=int, default=None, help="IVF lists (default 4*sqrt(n), power of 2)"
    )
    ap.add_argument("--pq-m", type=int, default=None, help="PQ bytes per vector (default d/4)")
    ap.add_argument("--nprobe", type=int, default=IndexParams().nprobe)
    ap.add_argument("--nprobes", default="1,2,4,8,16,32,64", help="nprobe values measured")
    ap.add_argument("--rerank", type=int, default=IndexParams().rerank)
    ap.add_argument("--train-per-list", type=int, default=IndexParams().train_per_list)
    ap.add_argument(
        "--build-threads", type=int, default=None, help="FAISS threads for the scale builds"
    )
    ap.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_threads:
        faiss.omp_set_num_threads(args.build_threads)
    if args.probe:
        probe(Path(args.probe), [int(p) for p in args.nprobes.split(",")])
        return
    print(
        f"faiss {faiss.__version__}, {os.cpu_count()} cpus, numpy {np.__version__}, load {load_avg()}"
    )
    for n in (int(s) for s in args.sizes.split(",") if s):
        bench_retrieval(n, args.dim, args)
    for n in (int(s) for s in args.scale.split(",") if s):
        bench_scale(n, args.scale_dim, args)
    if not args.skip_catalog:
        bench_add(args.adds, args.dim)
        bench_skill_add(args.adds)
        bench_list(args.list_versions)
    print("\n| section | measure | value | goal | met |\n|---|---|---|---|---|")
    for r in ROWS:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
