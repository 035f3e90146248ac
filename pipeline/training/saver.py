"""Checkpoints that do not stall training: a local snapshot, then the rest in the background.

`Saver.save` (collective) blocks only while DeepSpeed writes step-N into the node-local
staging folder (the run folder itself when run_dir is local). One thread per node then hashes
those files and uploads them; rank 0's thread finally writes `COMPLETE` (with every file's
sha256), syncs the logs and prunes. Chosen over torch DCP's async_save because DeepSpeed's
ZeRO engines save through their own format (what resume and ds_to_universal read); the
snapshot is a plain local write, and the slow part, the upload, is what moves off the loop.

At most one checkpoint is in flight: the next save (or the end of training) first waits for
it, and logs that it did. A process killed meanwhile leaves a step folder without `COMPLETE`:
the previous complete one stays the resume point and the next start removes the partial one.
Background threads make no collective calls (they would race the training loop's); nodes
other than rank 0's report their files' digests through `<run_dir>/.uploads/step-N/rank-R.json`.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time

import torch
import torch.distributed as dist

from pipeline import storage
from pipeline.training import checkpoint as ckpt
from pipeline.training import universal

log = logging.getLogger(__name__)
UPLOADS = ckpt.UPLOADS


class Saver:
    """Saves of one process; build it on every rank (the constructor is collective)."""

    def __init__(self, folder: ckpt.RunFolder, *, rank: int, local_rank: int, keep_last: int):
        self.folder, self.rank, self.local_rank, self.keep_last = folder, rank, local_rank, keep_last
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.world_size = world
        # Node leaders hash (and upload) their node's files; a local run_dir is one shared folder.
        self.leaders = [r for r, lr in enumerate(ckpt.gather(local_rank)) if lr == 0] if folder.remote else [0]
        self._thread: threading.Thread | None = None
        self._uploaded = threading.Event()  # this node's files (and, off rank 0, their digests) are up
        self._error: BaseException | None = None
        self._in_flight: int | None = None
        self.complete: str | None = None  # the newest checkpoint known complete

    @property
    def leader(self) -> bool:
        return self.rank in self.leaders

    def save(self, engine, step: int, client: dict, extra: dict | None = None) -> str:
        """Collective: snapshot step-N locally and start its upload; returns its URL (complete
        once `wait` returns or the next save starts)."""
        self.wait()
        tag = f"step-{step}"
        local_step = self.folder.local / tag
        if self.folder.remote and self.local_rank == 0:
            shutil.rmtree(local_step, ignore_errors=True)
        ckpt.barrier()
        engine.save_checkpoint(
            str(self.folder.local),
            tag=tag,
            client_state={"step": step, **universal.client_state()},
            save_latest=False,
        )
        local_step.mkdir(parents=True, exist_ok=True)
        torch.save(client, local_step / ckpt.client_name(self.rank))
        ckpt.barrier()
        if self.leader:
            marker = {
                "format_version": ckpt.FORMAT_VERSION,
                "step": step,
                "world_size": self.world_size,
                **(extra or {}),
            }
            metrics = self.folder.local / "metrics.jsonl"
            # The log as of this step (the loop appends to it meanwhile)
            logs = metrics.read_bytes() if self.rank == 0 and metrics.exists() else None
            self._in_flight = step
            self._uploaded.clear()
            self._thread = threading.Thread(
                target=self._run, args=(step, marker, logs), name=f"mfm-upload-{tag}", daemon=True
            )
            self._thread.start()
        else:
            self._in_flight = step
        return self.folder.step_url(step)

    def wait(self) -> str | None:
        """Collective: until the checkpoint in flight is complete; returns the newest complete URL."""
        if self._in_flight is None:
            return self.complete
        start = time.perf_counter()
        waited = self._thread is not None and self._thread.is_alive()
        if waited:
            log.info("waiting for the upload of step-%d to finish", self._in_flight)
        if self._thread is not None:
            self._uploaded.wait()
        if self._error is None:
            # Every node's files and digests are up once all ranks are here, so rank 0's thread
            # needs nothing more from the others: a node lost during the upload fails this
            # collective within train.dist_timeout_s instead of rank 0 waiting for its digests.
            ckpt.barrier()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if waited:
            log.info("step-%d uploaded after %.1f s more", self._in_flight, time.perf_counter() - start)
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"checkpoint step-{self._in_flight} failed: {error}") from error
        self.complete = self.folder.step_url(self._in_flight)
        self._in_flight = None
        return self.complete

    # ------------------------------------------------------------------ background

    def _run(self, step: int, marker: dict, logs: bytes | None) -> None:
        try:
            self._finish(step, marker, logs)
        except BaseException as e:  # raised in the main thread at the next save / wait
            log.exception("checkpoint step-%d failed in the background", step)
            self._error = e
        finally:
            self._uploaded.set()

    def _finish(self, step: int, marker: dict, logs: bytes | None) -> None:
        folder, tag = self.folder, f"step-{step}"
        local_step = folder.local / tag
        start = time.perf_counter()
        hashes = ckpt.digests(local_step)
        if folder.remote:
            ckpt.upload_tree(folder, local_step, folder.step_url(step))
        if self.rank != 0:
            url = storage.join(folder.url, UPLOADS, tag, f"rank-{self.rank}.json")
            storage.write_bytes(url, json.dumps(hashes).encode(), folder.storage)
            shutil.rmtree(local_step, ignore_errors=True)
            return
        self._uploaded.set()
        for leader in self.leaders[1:]:
            hashes |= self._node_digests(tag, leader)
        fs, path = folder.fs()
        listed = ckpt.retry(folder, lambda: fs.find(f"{path}/{tag}"), f"list {tag}")
        uploaded = {f.rsplit(f"/{tag}/", 1)[-1] for f in listed}
        if uploaded != set(hashes):
            raise ckpt.CheckpointError(
                f"{folder.step_url(step)}: the files in place {sorted(uploaded ^ set(hashes))} differ from those hashed"
            )
        marker = {**marker, "time": time.time(), "files": sorted(hashes), "sha256": hashes}
        ckpt.sync_logs_up(folder, metrics=logs)
        storage.write_bytes(
            storage.join(folder.step_url(step), ckpt.MARKER), json.dumps(marker, indent=1).encode(), folder.storage
        )
        log.info(
            "checkpoint %s complete (%.1f s in the background)", folder.step_url(step), time.perf_counter() - start
        )
        ckpt.prune(folder, self.keep_last)
        if len(self.leaders) > 1:
            ckpt.retry(folder, lambda: fs.rm(f"{path}/{UPLOADS}/{tag}", recursive=True), f"remove {UPLOADS}/{tag}")
        if folder.remote:
            shutil.rmtree(local_step, ignore_errors=True)

    def _node_digests(self, tag: str, leader: int) -> dict[str, str]:
        url = storage.join(self.folder.url, UPLOADS, tag, f"rank-{leader}.json")
        waited = time.monotonic()
        while not storage.exists(url, self.folder.storage):
            if time.monotonic() - waited > 60:
                log.info("%s: still waiting for rank %d's upload", tag, leader)
                waited = time.monotonic()
            time.sleep(0.5)
        return json.loads(storage.read_bytes(url, self.folder.storage))
