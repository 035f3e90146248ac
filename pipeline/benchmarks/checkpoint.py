"""`mfm bench checkpoint`: how long a checkpoint stops training, blocking vs in the background.

The tiny preset under DeepSpeed ZeRO-2 on N ranks (gloo), run_dir on an S3 endpoint (moto's
server, from the dev extra) reached through a TCP proxy that caps the bandwidth (default
20 MB/s, both directions together), as a slow link to object storage would. Three rounds in
one process group: no checkpoints (the step time), then a checkpoint every --every steps saved
blocking (snapshot, upload, COMPLETE, then train on: the old behaviour) and in the background
(pipeline.training.saver). Reported per checkpoint, in multiples of the step time: the stall
(time inside save, any wait for the previous upload included) and the extra wall time over
the same steps without checkpoints. Goal: background stall <= 1 step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

MODULE = "pipeline.benchmarks.checkpoint"


# ---------------------------------------------------------------- the slow link (parent process)


class Throttle:
    """One pace for all connections: each chunk waits until the link would have carried it."""

    def __init__(self, bytes_per_s: float):
        self.rate, self.next = bytes_per_s, 0.0

    async def take(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = max(now, self.next)
        self.next = start + n / self.rate
        if start > now:
            await asyncio.sleep(start - now)


async def _pipe(reader, writer, throttle: Throttle) -> None:
    try:
        while chunk := await reader.read(64 * 1024):
            await throttle.take(len(chunk))
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


def start_proxy(target_port: int, bytes_per_s: float) -> int:
    """A bandwidth-capped TCP proxy to 127.0.0.1:target_port in a daemon thread; its port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    throttle = Throttle(bytes_per_s)
    ready = threading.Event()

    async def handle(client_r, client_w):
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(_pipe(client_r, server_w, throttle), _pipe(server_r, client_w, throttle))

    async def serve():
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        ready.set()
        async with server:
            await server.serve_forever()

    threading.Thread(target=lambda: asyncio.run(serve()), daemon=True, name="bench-proxy").start()
    ready.wait(10)
    return port


def start_s3() -> tuple[object, int]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, port


# ---------------------------------------------------------------- the ranks


def worker(args) -> dict:
    import torch.distributed as dist

    from pipeline.benchmarks.train import ZeroContender, _batches
    from pipeline.config import load_config
    from pipeline.training import checkpoint as ckpt
    from pipeline.training.optim import batch_plan, scaled_lrs
    from pipeline.training.saver import Saver
    from pipeline.training.trainer import init_distributed

    ranks = init_distributed()
    cfg = load_config("tiny_cpu", [f"storage.endpoint_url={args.endpoint}", "train.zero_stage=2"])
    plan = batch_plan(cfg, ranks.world_size)
    contender = ZeroContender(cfg, plan, scaled_lrs(cfg.optim, plan.global_batch).lr, ranks.device, 2, "fp32")
    batches = _batches(cfg, plan.micro_batch, 4, ranks.device, seed=ranks.rank)

    def step(i: int) -> None:
        contender.step(batches[i % len(batches)]).item()

    for i in range(args.warmup):
        step(i)
    result = {"world_size": ranks.world_size, "steps": args.steps, "every": args.every, "rounds": {}}
    for mode in ("none", "blocking", "background"):
        folder = ckpt.run_folder(f"s3://bench/{mode}-{args.stamp}", cfg.storage)
        saver = Saver(folder, rank=ranks.rank, local_rank=ranks.local_rank, keep_last=2)
        step_times, stalls = [], []
        dist.barrier()
        start = time.perf_counter()
        for i in range(1, args.steps + 1):
            t = time.perf_counter()
            step(i)
            step_times.append(time.perf_counter() - t)
            if mode != "none" and i % args.every == 0:
                t = time.perf_counter()
                saver.save(contender.engine, i, {"step": i})
                if mode == "blocking":
                    saver.wait()
                stalls.append(time.perf_counter() - t)
        t = time.perf_counter()
        saver.wait()
        final_wait = time.perf_counter() - t
        wall = time.perf_counter() - start - final_wait
        result["rounds"][mode] = {
            "step_s": statistics.median(step_times),
            "stalls_s": stalls,
            "wall_s": wall,
            "final_wait_s": final_wait,
        }
        if ranks.rank == 0 and mode != "none":
            size = sum(f.stat().st_size for f in folder.local.rglob("*") if f.is_file())
            result["rounds"][mode]["staging_bytes_left"] = size
    fs, path = ckpt.run_folder(f"s3://bench/blocking-{args.stamp}", cfg.storage).fs()
    result["checkpoint_bytes"] = sum(fs.du(p) for p in fs.ls(path) if p.rsplit("/", 1)[-1].startswith("step-")) // 2
    return result


def print_table(result: dict, mb_per_s: float) -> None:
    rounds = result["rounds"]
    step = rounds["none"]["step_s"]
    print(
        f"tiny preset, ZeRO-2, {result['world_size']} ranks, {result['steps']} steps, a checkpoint every "
        f"{result['every']} steps of ~{result['checkpoint_bytes'] / 1e6:.1f} MB, S3 behind a {mb_per_s:g} MB/s link; "
        f"step {step * 1000:.0f} ms"
    )
    print(f"{'mode':<11} {'stall/ckpt':>11} {'in steps':>9} {'extra wall/ckpt':>16} {'in steps':>9}")
    base = rounds["none"]["wall_s"]
    for mode in ("blocking", "background"):
        r = rounds[mode]
        stall = statistics.median(r["stalls_s"])
        extra = (r["wall_s"] - base) / max(1, len(r["stalls_s"]))
        print(f"{mode:<11} {stall:>10.2f}s {stall / step:>9.2f} {extra:>15.2f}s {extra / step:>9.2f}")


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mfm bench checkpoint", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--nprocs", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=10, help="steps between checkpoints")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--mb-per-s", type=float, default=20.0, help="the link's bandwidth, MB/s")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    import boto3

    from pipeline.training.launcher import spawn_local

    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    server, s3_port = start_s3()
    try:
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3_port}").create_bucket(Bucket="bench")
        proxy = start_proxy(s3_port, args.mb_per_s * 1e6)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            worker_args = ["--out", str(out), "--endpoint", f"http://127.0.0.1:{proxy}", "--stamp", str(time.time_ns())]
            worker_args += ["--steps", str(args.steps), "--every", str(args.every), "--warmup", str(args.warmup)]
            env["MFM_STAGING_DIR"] = str(Path(tmp) / "staging")
            code = spawn_local(MODULE, worker_args, args.nprocs, env=env)
            if code:
                print(f"mfm bench checkpoint: a rank failed with exit code {code}", file=sys.stderr)
                return code
            result = json.loads(out.read_text())
    finally:
        server.stop()
    print_table(result, args.mb_per_s)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def _worker_main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--endpoint", required=True)
    p.add_argument("--stamp", required=True)
    p.add_argument("--steps", type=int)
    p.add_argument("--every", type=int)
    p.add_argument("--warmup", type=int)
    args = p.parse_args()
    import torch.distributed as dist

    result = worker(args)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(result))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
