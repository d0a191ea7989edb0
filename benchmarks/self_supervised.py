"""cvzoo's NT-Xent loss and miners against pytorch-metric-learning's (PML), and the NearestNeighborIndex backends.

Measures, in one process:
  ntxent  forward + backward of SimCLR's NT-Xent on (2N, D) embeddings of two views (D = 128, temperature 0.1):
          `cvzoo.ssl.nt_xent_loss(z1, z2)` against `pytorch_metric_learning.losses.NTXentLoss` called with the
          2N rows and labels `arange(N).repeat(2)` (a row's only positive is its other view). N is the batch of
          images. The two losses and their gradients are compared before timing.
  miners  batch-hard, semi-hard (margin 0.2) and distance-weighted (cutoffs 0.5 / 1.4) miners on (N, 128)
          L2-normalised embeddings with labels drawn uniformly from N / 4 classes, against PML's
          `BatchHardMiner`, `TripletMarginMiner(type_of_triplets="semihard")` and `DistanceWeightedMiner`.
          The mined triplets are compared (see `compare_triplets` for the conventions that differ).
  index   for every available NearestNeighborIndex backend: build time (constructor, `add` of --index-size
          random 128-d vectors and a first one-query search, which builds Annoy's forest and loads the Milvus
          collection), search time for --queries queries at k = 10 (one call; Milvus: --milvus-query-chunk
          queries a call), and recall@10 against the exact "torch" backend.
Prints medians (after a warm-up call), cvzoo / PML time and peak-memory ratios (< 1: cvzoo faster / smaller)
and writes everything to --json. Peak memory is what the call allocates above what was live before it: on CUDA
`torch.cuda.max_memory_allocated`, on the CPU the torch profiler's allocator events (profile_memory=True,
the running sum of allocations and frees), from one extra call. PML configurations whose cost grows as N^3
are skipped, with the reason printed, when their estimated memory exceeds --max-gb or a call is predicted to
take longer than --max-call-s.

    python benchmarks/self_supervised.py --quick                    # smoke run, under a minute
    python benchmarks/self_supervised.py --json ssl.json            # CPU, N = 256 ... 8192, 20,000 vectors
    python benchmarks/self_supervised.py --device cuda --parts ntxent miners --json ssl_cuda.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from cvzoo.profiling import median_seconds
from cvzoo.ssl import (
    NearestNeighborIndex,
    batch_hard_miner,
    distance_weighted_miner,
    nt_xent_loss,
    recall_at_k,
    semi_hard_miner,
)
from cvzoo.ssl.index import BACKENDS

DIM = 128
TEMPERATURE = 0.1
MARGIN = 0.2
CUTOFF, NONZERO_LOSS_CUTOFF = 0.5, 1.4


# ----------------------------------------------------------------------------------------------------------------
# measurement helpers


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


@contextlib.contextmanager
def quiet_stderr():
    """Silences file descriptor 2 (kineto prints start/stop lines from C++ on every profiled call)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_mib(fn: Callable[[], object], device: str) -> float:
    """MiB allocated by one call of `fn` above what was live before it (the high-water mark of the call)."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak / 2**20


class Guard:
    """Skips a configuration whose estimated memory exceeds --max-gb, or whose call is predicted (from the same
    implementation's previous size and its complexity exponent) to take longer than --max-call-s."""

    def __init__(self, max_gb: float, max_call_s: float) -> None:
        self.max_bytes, self.max_call_s = max_gb * 2**30, max_call_s
        self.last: dict[str, tuple[int, float]] = {}

    def check(self, key: str, n: int, est_bytes: float, exponent: int, what: str) -> str | None:
        if est_bytes > self.max_bytes:
            return f"skipped ({what}: ~{est_bytes / 2**30:.1f} GB > --max-gb {self.max_bytes / 2**30:g})"
        if key in self.last:
            n0, t0 = self.last[key]
            predicted = t0 * (n / n0) ** exponent
            if predicted > self.max_call_s:
                return f"skipped ({what}: ~{predicted:.0f} s a call predicted > --max-call-s {self.max_call_s:g})"
        return None

    def record(self, key: str, n: int, seconds: float) -> None:
        self.last[key] = (n, seconds)


def measure(fn: Callable[[], object], device: str, repeats: int, budget_s: float) -> dict:
    """Median ms of `fn` after one timed warm-up call; fewer repeats (at least 1) when the warm-up call shows that
    `repeats` would exceed `budget_s`. Then peak memory from one more call."""
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    reps = max(1, min(repeats, int(budget_s / max(first, 1e-9))))
    ms = 1e3 * median_seconds(fn, device, reps, warmup=0)
    return {"ms": ms, "repeats": reps, "peak_mib": peak_mib(fn, device)}


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def fmt(x: float | None, spec: str, unit: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{unit}"


# ----------------------------------------------------------------------------------------------------------------
# NT-Xent


def ntxent_check(device: str) -> dict:
    """cvzoo and PML NT-Xent on the same small float64 input: loss and gradient differences."""
    from pytorch_metric_learning.losses import NTXentLoss

    torch.manual_seed(0)
    n = 64
    z = torch.randn(2 * n, DIM, dtype=torch.float64, device=device, requires_grad=True)
    ours = nt_xent_loss(z[:n], z[n:], TEMPERATURE)
    (g_ours,) = torch.autograd.grad(ours, z)
    theirs = NTXentLoss(temperature=TEMPERATURE)(z, torch.arange(n, device=device).repeat(2))
    (g_theirs,) = torch.autograd.grad(theirs, z)
    out = {"n": n, "dtype": "float64", "loss_cvzoo": ours.item(), "loss_pml": theirs.item(),
           "loss_abs_diff": (ours - theirs).abs().item(), "grad_max_abs_diff": (g_ours - g_theirs).abs().max().item()}
    print(f"NT-Xent check (N={n}, float64): loss cvzoo {out['loss_cvzoo']:.10f}  PML {out['loss_pml']:.10f}  "
          f"|diff| {out['loss_abs_diff']:.2e}  max |grad diff| {out['grad_max_abs_diff']:.2e}", flush=True)
    return out


def bench_ntxent(args, guard: Guard) -> list[dict]:
    from pytorch_metric_learning.losses import NTXentLoss

    device, rows = args.device, []
    pml_loss = NTXentLoss(temperature=TEMPERATURE)
    for n in args.batches:
        torch.manual_seed(0)
        z = torch.randn(2 * n, DIM, device=device, requires_grad=True)
        labels = torch.arange(n, device=device).repeat(2)
        row: dict = {"n": n, "rows": 2 * n}

        def ours(z=z, n=n):
            z.grad = None
            nt_xent_loss(z[:n], z[n:], TEMPERATURE).backward()

        def theirs(z=z, labels=labels):
            z.grad = None
            pml_loss(z, labels).backward()

        # cvzoo: a few (2N, 2N) float32 matrices (logits, masked logits, softmax, their gradients)
        plan = [("cvzoo", ours, 6 * 4 * (2 * n) ** 2, 2, "(2N)^2 logits"),
                ("pml", theirs, _pml_ntxent_bytes(n), 3, "PML's (2N) x (2N)^2 positive-negative matrix")]
        for name, fn, est, exponent, what in plan:
            skip = guard.check(f"ntxent-{name}", n, est, exponent, what)
            if skip:
                row[f"{name}_skipped"] = skip
                continue
            r = measure(fn, device, args.repeats, args.budget_s)
            guard.record(f"ntxent-{name}", n, r["ms"] / 1e3)
            row.update({f"{name}_ms": r["ms"], f"{name}_repeats": r["repeats"], f"{name}_peak_mib": r["peak_mib"]})
        if "cvzoo_ms" in row and "pml_ms" in row:  # float32 values on the benchmark input
            with torch.no_grad():
                row["loss_diff"] = (nt_xent_loss(z[:n], z[n:], TEMPERATURE) - pml_loss(z, labels)).abs().item()
        row["time_ratio_cvzoo_over_pml"] = ratio(row.get("cvzoo_ms"), row.get("pml_ms"))
        row["mem_ratio_cvzoo_over_pml"] = ratio(row.get("cvzoo_peak_mib"), row.get("pml_peak_mib"))
        rows.append(row)
        print(f"NT-Xent N={n:<5d} (2N={2 * n:<5d}) cvzoo {fmt(row.get('cvzoo_ms'), '9.2f', ' ms')} "
              f"peak {fmt(row.get('cvzoo_peak_mib'), '8.1f', ' MiB')} | PML "
              + (f"{row['pml_ms']:9.2f} ms peak {row['pml_peak_mib']:8.1f} MiB | cvzoo/PML time "
                 f"{row['time_ratio_cvzoo_over_pml']:.4f}x memory {row['mem_ratio_cvzoo_over_pml']:.4f}x"
                 f" | |loss diff| {row['loss_diff']:.1e}"
                 if "pml_ms" in row else row.get("pml_skipped", "")), flush=True)
    return rows


def _pml_ntxent_bytes(n: int) -> float:
    """PML's NTXentLoss builds a (P, Q) float matrix, P = 2N positive pairs by Q = 2N (2N - 2) negative pairs, and
    several copies of it (the mask, the masked logits, their exponential, the gradients): about 20 bytes each."""
    p = 2 * n
    return 20.0 * p * p * (p - 2)


# ----------------------------------------------------------------------------------------------------------------
# miners


def _triplet_codes(t: tuple, n: int) -> torch.Tensor:
    a, p, neg = (x.long().cpu() for x in t[:3])
    return (a * n + p) * n + neg


def compare_triplets(kind: str, ours: tuple, theirs: tuple, n: int) -> dict:
    """How the mined triplets of the two libraries relate.

    batch-hard: the same set expected. semi-hard: cvzoo keeps the hardest semi-hard negative of each (a, p),
    PML returns every semi-hard triplet, so cvzoo's set should lie inside PML's and cover the same (a, p) pairs
    (PML's bound d(a, n) <= d(a, p) + margin is inclusive, cvzoo's strict). Both decide d(a, p) < d(a, n) in
    float32, from `torch.cdist` over a chunk of rows (cvzoo) or the whole matrix (PML), so near-ties (|d(a, n) -
    d(a, p)| ~ 1e-7) can fall on different sides. distance-weighted: random draws, only the counts compare.
    """
    out = {"triplets_cvzoo": int(ours[0].numel()), "triplets_pml": int(theirs[0].numel())}
    if kind == "distance-weighted":
        return out
    co, ct = _triplet_codes(ours, n), _triplet_codes(theirs, n)
    out["cvzoo_not_in_pml"] = int((~torch.isin(co, ct)).sum())
    if kind == "batch-hard":
        out["pml_not_in_cvzoo"] = int((~torch.isin(ct, co)).sum())
    else:  # (a, p) pairs with a semi-hard negative in one library and not in the other
        ap_ours, ap_theirs = (co // n).unique(), (ct // n).unique()
        out["ap_pairs_differing"] = int((~torch.isin(ap_ours, ap_theirs)).sum()
                                        + (~torch.isin(ap_theirs, ap_ours)).sum())
    return out


def bench_miners(args, guard: Guard) -> list[dict]:
    from pytorch_metric_learning import miners as pml_miners

    device, rows = args.device, []
    pml = {"batch-hard": pml_miners.BatchHardMiner(),
           "semi-hard": pml_miners.TripletMarginMiner(margin=MARGIN, type_of_triplets="semihard"),
           "distance-weighted": pml_miners.DistanceWeightedMiner(cutoff=CUTOFF,
                                                                 nonzero_loss_cutoff=NONZERO_LOSS_CUTOFF)}
    for n in args.miner_sizes:
        torch.manual_seed(0)
        emb = F.normalize(torch.randn(n, DIM, device=device), dim=1)
        labels = torch.randint(0, max(1, n // 4), (n,), device=device)
        counts = torch.bincount(labels).double()
        all_triplets = float((counts * (counts - 1) * (n - counts)).sum())  # (a, p, n) candidates PML enumerates
        g = torch.Generator(device=device)

        def distance_weighted(emb=emb, labels=labels, g=g):
            return distance_weighted_miner(emb, labels, cutoff=CUTOFF, nonzero_loss_cutoff=NONZERO_LOSS_CUTOFF,
                                           generator=g.manual_seed(0))

        ours = {"batch-hard": functools.partial(batch_hard_miner, emb, labels),
                "semi-hard": functools.partial(semi_hard_miner, emb, labels, MARGIN),
                "distance-weighted": distance_weighted}
        # PML's semi-hard miner enumerates every (a, p, n) triplet: below 2^31 of N^3 as one (N, N, N) uint8
        # product, above as int64 index lists, plus their distances (~60 bytes a triplet). The enumerated
        # triplets number ~N^2 (N^2 (N / classes) here), so time is extrapolated as N^2.
        sh_bytes = 60.0 * all_triplets + (2.0 * n**3 if n**3 < 2**31 else 0.0)
        # PML's distance-weighted miner copies an (N, N - n_class) weight block for each of the N / 4 labels: N^3.
        pml_plan = {"batch-hard": (16.0 * n * n, 2, "N^2 distances and masks"),
                    "semi-hard": (sh_bytes, 2, f"N^3 triplets: {all_triplets:.2e} enumerated"),
                    "distance-weighted": (24.0 * n * n, 3, "a (N, N) weight copy per label")}
        for kind in ("batch-hard", "semi-hard", "distance-weighted"):
            row: dict = {"miner": kind, "n": n, "classes": max(1, n // 4)}
            results = {}
            for name, fn, est, exponent, what in (
                    ("cvzoo", ours[kind], 48.0 * 2**22 + 64.0 * n * DIM, 2, "chunked (rows, N) blocks"),
                    ("pml", functools.partial(pml[kind], emb, labels), *pml_plan[kind])):
                key = f"{kind}-{name}"
                skip = guard.check(key, n, est, exponent, what)
                if skip:
                    row[f"{name}_skipped"] = skip
                    continue
                r = measure(fn, device, args.repeats, args.budget_s)
                guard.record(key, n, r["ms"] / 1e3)
                row.update({f"{name}_ms": r["ms"], f"{name}_repeats": r["repeats"], f"{name}_peak_mib": r["peak_mib"]})
                results[name] = fn()
            if len(results) == 2:
                row.update(compare_triplets(kind, results["cvzoo"], results["pml"], n))
            elif "cvzoo" in results:
                row["triplets_cvzoo"] = int(results["cvzoo"][0].numel())
            row["time_ratio_cvzoo_over_pml"] = ratio(row.get("cvzoo_ms"), row.get("pml_ms"))
            row["mem_ratio_cvzoo_over_pml"] = ratio(row.get("cvzoo_peak_mib"), row.get("pml_peak_mib"))
            rows.append(row)
            checks = {k: v for k, v in row.items()
                      if k in ("cvzoo_not_in_pml", "pml_not_in_cvzoo", "ap_pairs_differing")}
            print(f"{kind:17s} N={n:<5d} cvzoo {fmt(row.get('cvzoo_ms'), '9.2f', ' ms')} "
                  f"peak {fmt(row.get('cvzoo_peak_mib'), '8.1f', ' MiB')} | PML "
                  + (f"{row['pml_ms']:9.2f} ms peak {row['pml_peak_mib']:8.1f} MiB | cvzoo/PML time "
                     f"{row['time_ratio_cvzoo_over_pml']:.3f}x memory {row['mem_ratio_cvzoo_over_pml']:.3f}x"
                     if "pml_ms" in row else row.get("pml_skipped", ""))
                  + f" | triplets {row.get('triplets_cvzoo', '-')} / {row.get('triplets_pml', '-')}"
                  + (f" {checks}" if checks else ""), flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# nearest-neighbour index


def backend_options(backend: str, threads: int, tmpdir: str, i: int) -> dict:
    if backend == "annoy":
        return {"n_jobs": threads}
    if backend == "milvus":
        return {"uri": str(Path(tmpdir) / f"bench_{i}.db")}  # Milvus Lite, a fresh local db per build
    return {}


def bench_index(args) -> list[dict]:
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        pass
    g = torch.Generator().manual_seed(0)
    db = torch.randn(args.index_size, DIM, generator=g)
    queries = torch.randn(args.queries, DIM, generator=g)
    rows, exact_ids = [], None
    with tempfile.TemporaryDirectory(prefix="cvzoo-bench-ssl-") as tmpdir:
        for backend in args.backends:
            row: dict = {"backend": backend, "size": args.index_size, "queries": args.queries, "k": args.k,
                         "metric": args.metric}
            builds, index = [], None
            try:
                for i in range(args.build_repeats):
                    if index is not None:
                        index.close()
                    t0 = time.perf_counter()
                    index = NearestNeighborIndex(DIM, backend=backend, metric=args.metric,
                                                 **backend_options(backend, args.threads, tmpdir, i))
                    index.add(db)
                    index.search(queries[:1], args.k)  # Annoy builds its forest here, Milvus loads
                    builds.append(time.perf_counter() - t0)
            except ImportError as err:  # optional dependency missing
                row["skipped"] = f"skipped ({err})"
                rows.append(row)
                print(f"index {backend:11s} {row['skipped']}", flush=True)
                continue
            row["build_s"] = sorted(builds)[len(builds) // 2]
            # Milvus Lite's memory grows by ~1 KB per (query, stored vector) pair within one search call (~21 GB
            # for 1,000 queries over 20,000 vectors): its queries go in chunks of --milvus-query-chunk.
            chunk = args.milvus_query_chunk if backend == "milvus" else args.queries
            row["query_chunk"] = chunk

            def search(index=index, chunk=chunk):
                return torch.cat([index.search(q, args.k).ids for q in queries.split(chunk)])

            t0 = time.perf_counter()
            ids = search()  # warm-up call, also the ids for the recall
            reps = max(1, min(args.repeats, int(args.budget_s / (time.perf_counter() - t0))))
            row["search_ms"] = 1e3 * median_seconds(search, "cpu", reps, warmup=0)
            row["search_repeats"] = reps
            row["queries_per_s"] = args.queries / (row["search_ms"] / 1e3)
            if backend == "torch":
                exact_ids = ids
            row["recall_at_k"] = recall_at_k(ids, exact_ids) if exact_ids is not None else None
            index.close()
            rows.append(row)
            print(f"index {backend:11s} N={args.index_size} build {row['build_s']:8.3f} s  search {args.queries} "
                  f"queries k={args.k} ({chunk} a call) {row['search_ms']:9.2f} ms ({row['queries_per_s']:7.0f} q/s)  "
                  f"recall@{args.k} {fmt(row['recall_at_k'], '.3f')}", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch (and faiss / Annoy) threads")
    p.add_argument("--parts", nargs="+", default=["ntxent", "miners", "index"], choices=["ntxent", "miners", "index"])
    p.add_argument("--batches", nargs="+", type=int, default=[256, 1024, 4096, 8192], help="NT-Xent: N images")
    p.add_argument("--miner-sizes", nargs="+", type=int, default=[256, 1024, 4096, 8192])
    p.add_argument("--repeats", type=int, default=5, help="timed calls after one warm-up (fewer for slow calls)")
    p.add_argument("--budget-s", type=float, default=20.0, help="cap on a configuration's timed calls, seconds")
    p.add_argument("--max-gb", type=float, default=6.0, help="skip a configuration estimated to need more memory")
    p.add_argument("--max-call-s", type=float, default=40.0, help="skip a call predicted to take longer")
    p.add_argument("--index-size", type=int, default=20_000)
    p.add_argument("--queries", type=int, default=1_000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--metric", default="l2", choices=["l2", "cosine", "ip"])
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS,
                   help="'torch' (exact) first: the others' recall is measured against it")
    p.add_argument("--build-repeats", type=int, default=3)
    p.add_argument("--milvus-query-chunk", type=int, default=100, help="queries per Milvus search call")
    p.add_argument("--quick", action="store_true", help="smoke run: N = 256 and 1024, 2,000 vectors, 2 repeats")
    p.add_argument("--json", default=None, help="write all results to this path")
    args = p.parse_args()
    if args.quick:
        args.batches, args.miner_sizes, args.index_size = [256, 1024], [256, 1024], 2_000
        args.repeats, args.build_repeats, args.budget_s = min(args.repeats, 2), 1, min(args.budget_s, 5.0)
    if "torch" in args.backends:  # the exact reference first
        args.backends = ["torch"] + [b for b in args.backends if b != "torch"]
    torch.set_num_threads(args.threads)
    import pytorch_metric_learning

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"{cpu_name()} ({os.cpu_count()} cores)"
    print(f"device: {device_name}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"pytorch-metric-learning {pytorch_metric_learning.__version__}", flush=True)
    guard = Guard(args.max_gb, args.max_call_s)
    report: dict = {"device": device_name, "torch": torch.__version__, "threads": args.threads,
                    "pytorch_metric_learning": pytorch_metric_learning.__version__, "args": vars(args)}
    if "ntxent" in args.parts:
        report["ntxent_check"] = ntxent_check(args.device)
        report["ntxent"] = bench_ntxent(args, guard)
    if "miners" in args.parts:
        report["miners"] = bench_miners(args, guard)
    if "index" in args.parts:
        report["index"] = bench_index(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
