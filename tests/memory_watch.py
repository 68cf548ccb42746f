"""Peak memory of a local Ray cluster while a job runs: what tests and benchmarks state bounds on."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def children(parent: int) -> list[int]:
    """Pids whose parent is `parent` (Ray's worker processes are the raylet's children)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            found.append(int(stat.parent.name))
    return found


class MemoryWatch:
    """Peaks sampled every `interval` seconds inside `with`, for the local Ray node this process started:

    peak_store   bytes in the object store (the raylet's own count, every node), where Ray Data's
                 blocks live: what grows with the images in flight
    peak_rss     RSS of this process (the driver) plus every worker process of the node, summed:
                 it moves with how many worker processes Ray keeps (each imports torch), not only
                 with what they hold
    peak_process_rss   the largest RSS of any one of those processes
    spilled      bytes the store spilled to disk while watched (a job that outgrew the store)
    """

    def __init__(self, interval: float = 0.05):
        import ray
        from ray._private import internal_api

        self.interval, self.peak_store, self.peak_rss, self.peak_process_rss, self.spilled = interval, 0, 0, 0, 0
        self._spilled_at_start: int | None = None
        self._state = internal_api.get_state_from_address(ray.get_runtime_context().gcs_address)
        node = ray._private.worker._global_node
        self._raylet = node.all_processes["raylet"][0].process.pid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _store(self):
        from ray._private import internal_api

        return internal_api.get_memory_info_reply(self._state, timeout_seconds=10).store_stats

    def sample(self) -> None:
        stats = self._store()
        self.peak_store = max(self.peak_store, stats.object_store_bytes_used)
        self._spilled_at_start = (
            self._spilled_at_start if self._spilled_at_start is not None else stats.spilled_bytes_total
        )
        self.spilled = stats.spilled_bytes_total - self._spilled_at_start
        each = [rss_bytes(os.getpid())] + [rss_bytes(pid) for pid in children(self._raylet)]
        self.peak_rss = max(self.peak_rss, sum(each))
        self.peak_process_rss = max(self.peak_process_rss, max(each))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> MemoryWatch:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
