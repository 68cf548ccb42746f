"""simpsons.files: the one naming of partial files and folders, and the node lock.

What each caller does with them (archive removes dead partials, datasets and downloads take one
over) is tested with the caller: test_archive.py, test_storage.py, test_sources.py, test_backbones.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

from simpsons.files import dead_partials, fresh_partial, node_lock, partial_path, resumed_partial, scratch_folder


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)


def test_only_partials_of_dead_processes_of_this_host_are_dead(tmp_path):
    target = tmp_path / "data[1]"  # a glob character in the name
    host = socket.gethostname()
    assert partial_path(target) == tmp_path / f".data[1].partial-{host}-{os.getpid()}"
    dead = tmp_path / f".data[1].partial-{host}-{_dead_pid()}"
    alive = tmp_path / f".data[1].partial-{host}-{os.getppid()}"
    other_host = tmp_path / f".data[1].partial-{host}x-{_dead_pid()}"  # can't be checked from here
    other_target = tmp_path / f".data.partial-{host}-{_dead_pid()}"
    for path in (dead, alive, other_host, other_target):
        path.mkdir()
    assert list(dead_partials(target)) == [dead]
    (dead / "done.npy").write_bytes(b"verified")
    assert resumed_partial(target) == partial_path(target)
    assert (partial_path(target) / "done.npy").read_bytes() == b"verified" and not dead.exists()
    assert fresh_partial(target) == partial_path(target) and not partial_path(target).exists()
    assert sorted(tmp_path.iterdir()) == sorted([alive, other_host, other_target])


def test_the_node_lock_waits_for_its_holder_and_is_freed_when_the_holder_is_killed(tmp_path):
    lock = tmp_path / "x.lock"
    code = f"from simpsons.files import node_lock; import time\nwith node_lock({str(lock)!r}):\n print(1, flush=True); time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "1"  # it holds the lock
        taken = threading.Event()

        def take():
            with node_lock(lock):
                taken.set()

        waiter = threading.Thread(target=take, daemon=True)
        waiter.start()
        assert not taken.wait(1.0)  # waits while the holder lives
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert taken.wait(30)  # the kernel freed it with the killed process


def test_a_killed_process_scratch_folder_goes_when_the_next_process_makes_its_own(tmp_path, monkeypatch):
    """What a killed Train worker left in its scratch folder (a checkpoint not yet uploaded) is
    removed by the next process on the node; a live process's folder is left alone."""
    code = """if True:
        import os, signal
        from simpsons.files import scratch_folder
        (scratch_folder("w") / "checkpoint.pt").write_bytes(b"x")
        print(scratch_folder("w"), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)"""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    killed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    left = tmp_path / killed.stdout.strip()
    assert killed.returncode == -9 and (left / "checkpoint.pt").exists()
    alive = tmp_path / f".w.partial-{socket.gethostname()}-{os.getppid()}"
    alive.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))

    mine = scratch_folder("w")
    assert mine == partial_path(tmp_path / "w") and mine.is_dir()
    assert scratch_folder("w") == mine  # made once per process
    assert sorted(tmp_path.iterdir()) == sorted([alive, mine])
