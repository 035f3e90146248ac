"""`mfm bench shard`: sharding throughput against baselines measured in the same run.

- structural validation (the default) vs `tar cf` of the same files: goal >= 0.5x tar's MB/s
- decode validation vs decoding the same files with Pillow alone: goal <= 1.3x its time
The source files are read once first, so every method starts from a warm page cache; tar
writes to the same temporary folder (same disk) as the shards. Methods run interleaved
(A, B, C, ... A, B, C, ...): on a shared machine a slow spell hits all of them. Wall time is
what the goals are about; CPU time (this process and its children: tar, worker processes)
is printed beside it because it hardly moves with the machine's load.

`--dask N`: the cluster path against the local process pool at equal workers (1..N), goal
within 10% of the pool's images/s; the cluster (a distributed.LocalCluster on 127.0.0.1,
one thread per worker process) is started once, as a real one is long-lived, so its start is
not timed, while the pool's process start is (the pool starts with each run, as in `mfm shard`).
CPU time counts this process (which hosts the local cluster's scheduler), its children and
the workers. An untimed extra run shows how the work spreads: tasks per worker, bytes sent
and returned per task (the pickled call and result, through the scheduler) and shard bytes
written per task (worker to store). `--dest-dir /dev/shm` keeps disk flushes out of the timing.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import resource
import statistics
import subprocess
import tempfile
import time


def _files(root: str) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds."""
    t, c = time.perf_counter(), _cpu()
    fn()
    return time.perf_counter() - t, _cpu() - c


def _pillow_decode(files: list[str]) -> None:
    from PIL import Image

    for p in files:
        with open(p, "rb") as f:
            Image.open(io.BytesIO(f.read())).load()


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mfm bench shard", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", help="an ImageFolder dataset (default: build `mfm sample-data` in a temp dir)")
    p.add_argument("--per-class", type=int, default=200, help="sample-data images per class (default 200)")
    p.add_argument("--size", type=int, default=224, help="sample-data image side (default 224)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="sharding workers (default: the CPUs available, as `mfm shard`; tar and Pillow use one core)",
    )
    p.add_argument("--shard-size-mb", type=float, default=256, help="shard size (default 256, the production default)")
    p.add_argument("--split", default="train")
    p.add_argument("--repeat", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument(
        "--dask",
        type=int,
        default=None,
        metavar="N",
        help="compare Dask clusters of 1..N local workers with the local pool of as many workers",
    )
    p.add_argument("--validation", choices=["structural", "decode"], default="structural", help="with --dask")
    p.add_argument("--dest-dir", help="with --dask: where the shards go (default: the temporary folder)")
    p.add_argument(
        "--skip-decode",
        action="store_true",
        help="only tar and structural sharding (the decode pair takes the longest)",
    )
    args = p.parse_args(argv)
    logging.getLogger("pipeline.sharding").setLevel(logging.WARNING)

    from pipeline.processes import available_cpus
    from pipeline.sharding import shard_dataset

    args.workers = args.workers or available_cpus()

    with tempfile.TemporaryDirectory(prefix="mfm-bench-shard-") as tmp:
        source = args.source
        if source is None:
            from pipeline.sample_data import build

            source = build(os.path.join(tmp, "data"), per_class=args.per_class, size=args.size)["folder"]
        if args.dask:
            with tempfile.TemporaryDirectory(dir=args.dest_dir, prefix="mfm-bench-shard-") as out:
                return _dask_bench(args, source, out)
        files = _files(os.path.join(source, args.split))
        total = sum(os.path.getsize(f) for f in files)
        for f in files:  # warm the page cache so no method pays for the first read
            with open(f, "rb") as fh:
                fh.read()

        def shard(validation):
            dest = tempfile.mkdtemp(dir=tmp, prefix=validation)
            dests.append(dest)
            return lambda: shard_dataset(
                source,
                dest,
                splits=[args.split],
                workers=args.workers,
                shard_size_mb=args.shard_size_mb,
                validation=validation,
                progress=False,
            )

        dests: list[str] = []
        tar_out = os.path.join(tmp, "plain.tar")

        def tar_fsync():
            # What a committed shard costs at least: our shards are fsynced before the rename.
            subprocess.run(["tar", "cf", tar_out, "-C", source, args.split], check=True)
            fd = os.open(tar_out, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

        methods = {
            "tar cf (baseline)": lambda: subprocess.run(["tar", "cf", tar_out, "-C", source, args.split], check=True),
            "tar cf + fsync": tar_fsync,
            "shard, structural": lambda: shard("structural")(),
        }
        if not args.skip_decode:
            methods["Pillow decode (baseline)"] = lambda: _pillow_decode(files)
            methods["shard, decode"] = lambda: shard("decode")()
        runs = {name: [] for name in methods}
        for _ in range(max(1, args.repeat)):
            for name, fn in methods.items():
                runs[name].append(_timed(fn))
        from pipeline.sharding import read_manifest

        shards = len(read_manifest(os.path.join(dests[0], args.split))["shards"])

    n, mb = len(files), total / 1e6
    best = {name: min(w for w, _ in r) for name, r in runs.items()}
    cpu = {name: min(c for _, c in r) for name, r in runs.items()}
    used = min(args.workers, shards)
    print(
        f"{n} images, {mb:.1f} MB from {source}/{args.split} -> {shards} shard(s); {args.workers} worker(s) asked, "
        f"{used} used{' (in this process)' if used == 1 else ''}; {args.repeat} interleaved rounds, "
        "best wall and least CPU of each"
    )
    if not args.skip_decode:
        from pipeline.sharding.job import decode_threads

        print(
            f"decode validation: {decode_threads('decode', used)} decoding thread(s) per worker; "
            "the Pillow baseline uses one"
        )
    print()
    print(f"{'method':<26} {'wall s':>7} {'images/s':>9} {'MB/s':>7} {'CPU s':>7} {'CPU us/image':>13}")
    for name in methods:
        s, c = best[name], cpu[name]
        print(f"{name:<26} {s:>7.3f} {n / s:>9.0f} {mb / s:>7.1f} {c:>7.3f} {c / n * 1e6:>13.1f}")

    def ratios(a, b):
        """best-of ratio, and the median of the per-round ratios (the rounds are interleaved)."""
        return best[a] / best[b], statistics.median(x[0] / y[0] for x, y in zip(runs[a], runs[b]))

    speed, speed_med = ratios("tar cf (baseline)", "shard, structural")
    durable, _ = ratios("tar cf + fsync", "shard, structural")
    ok1 = speed >= 0.5
    print(
        f"\nstructural MB/s / tar MB/s       = {speed:.2f}x best, {speed_med:.2f}x median of rounds  "
        f"(goal >= 0.5x)  {'PASS' if ok1 else 'MISS'}"
    )
    print(
        f"  in CPU time                    = {cpu['tar cf (baseline)'] / cpu['shard, structural']:.2f}x  "
        "(context: tar is C, one process)"
    )
    print(f"structural MB/s / (tar + fsync)  = {durable:.2f}x  (context: both outputs durable)")
    if not args.skip_decode:
        # Time ratio: >1 means sharding is slower than decoding alone.
        cost = best["shard, decode"] / best["Pillow decode (baseline)"]
        cost_med = statistics.median(
            x[0] / y[0] for x, y in zip(runs["shard, decode"], runs["Pillow decode (baseline)"])
        )
        ok2 = cost <= 1.3
        print(
            f"decode time / Pillow decode time = {cost:.2f}x best, {cost_med:.2f}x median of rounds  "
            f"(goal <= 1.3x)  {'PASS' if ok2 else 'MISS'}"
        )
        print(f"  in CPU time                    = {cpu['shard, decode'] / cpu['Pillow decode (baseline)']:.2f}x")
    return 0


class _Measured:
    """DaskShards that also records the pickled size of each call and result."""

    def __init__(self, address: str):
        from pipeline.sharding.cluster import DaskShards

        self.runner = DaskShards(address)
        self.sent: list[int] = []
        self.returned: list[int] = []

    def __str__(self) -> str:
        return str(self.runner)

    def __call__(self, plans, split_url, class_of, opts, cfg):
        import cloudpickle

        self.sent += [len(cloudpickle.dumps((p, split_url, class_of, opts, cfg))) for p in plans]
        for i, r in self.runner(plans, split_url, class_of, opts, cfg):
            self.returned.append(len(cloudpickle.dumps(r)))
            yield i, r


def _dask_bench(args, source: str, tmp: str) -> int:
    """tmp: where the shards go."""
    from pipeline.sharding import read_manifest, shard_dataset
    from pipeline.sharding.cluster import DaskShards, import_distributed

    distributed = import_distributed()

    files = _files(os.path.join(source, args.split))
    n, mb = len(files), sum(os.path.getsize(f) for f in files) / 1e6
    for f in files:
        with open(f, "rb") as fh:
            fh.read()

    def run(workers=1, runner=None, client=None):
        """(wall s, CPU s of every process that took part, dest)."""
        dest = tempfile.mkdtemp(dir=tmp, prefix="dask" if runner else "pool")
        kw = {"splits": [args.split], "shard_size_mb": args.shard_size_mb, "validation": args.validation}
        workers_cpu = (lambda: sum(client.run(_cpu).values())) if client is not None else (lambda: 0.0)
        c0, t = _cpu() + workers_cpu(), time.perf_counter()
        shard_dataset(source, dest, workers=workers, runner=runner, progress=False, **kw)
        wall = time.perf_counter() - t
        return wall, _cpu() + workers_cpu() - c0, dest

    rows = []
    for w in range(1, args.dask + 1):
        with (
            distributed.LocalCluster(
                n_workers=w, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
            ) as cluster,
            distributed.Client(cluster, set_as_default=False) as client,
        ):
            pool, dask = [], []
            for _ in range(max(1, args.repeat)):  # interleaved: a slow spell hits both
                pool.append(run(workers=w)[:2])
                dask.append(run(runner=DaskShards(cluster.scheduler_address), client=client)[:2])
            # One more, untimed, run to see where the tasks went and what they carried.
            measured = _Measured(cluster.scheduler_address)
            with distributed.get_task_stream(client=client) as ts:
                dest = run(runner=measured)[2]
            per_worker: dict[str, int] = {}
            for rec in ts.data:
                per_worker[rec["worker"]] = per_worker.get(rec["worker"], 0) + 1
            shards = read_manifest(os.path.join(dest, args.split))["shards"]
        rows.append((w, pool, dask, per_worker, measured, shards))

    print(
        f"{n} images, {mb:.1f} MB from {source}/{args.split} to {tmp}, {args.validation} "
        f"validation, {args.shard_size_mb:g} MB shards; {args.repeat} interleaved rounds, best wall and least CPU "
        "of each (CPU: this process, its children and the Dask workers)"
    )
    print()
    header = f"{'workers':>7} {'pool img/s':>10} {'dask img/s':>10} {'dask/pool':>9} {'median':>7} {'CPU ratio':>9}  "
    print(
        header + f"{'overhead ms/task':>16}  {'tasks per worker':<18} {'sent B/task':>11} {'returned B/task':>15} "
        f"{'shard MB/task':>13}"
    )
    ok = True
    for w, pool, dask, per_worker, measured, shards in rows:
        best_pool, best_dask = min(x[0] for x in pool), min(x[0] for x in dask)
        ratio = best_pool / best_dask
        med = statistics.median(p[0] / d[0] for p, d in zip(pool, dask))
        cpu = min(x[1] for x in dask) / min(x[1] for x in pool)  # > 1: the cluster path costs more CPU
        ok &= ratio >= 0.9
        spread = "/".join(str(c) for c in sorted(per_worker.values(), reverse=True))
        # the cluster's extra wall time per task (negative: the pool's process start costs more)
        per_task = (best_dask - best_pool) / len(shards) * 1e3
        print(
            f"{w:>7} {n / best_pool:>10.0f} {n / best_dask:>10.0f} {ratio:>8.2f}x {med:>6.2f}x {cpu:>8.2f}x  "
            f"{per_task:>16.1f}  {spread:<18} "
            f"{statistics.mean(measured.sent):>11.0f} {statistics.mean(measured.returned):>15.0f} "
            f"{sum(s['bytes'] for s in shards) / len(shards) / 1e6:>13.2f}"
        )
    print(f"\ndask images/s / pool images/s at equal workers >= 0.9x (within 10%)  {'PASS' if ok else 'MISS'}")
    return 0
