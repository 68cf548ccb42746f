"""A real Ray head on 127.0.0.1, started the way a cluster node starts one: `ray start --head`,
and, for multi-node tests, more Ray nodes joined to it the way a worker machine joins one
(tests/ray_node.py), each with its own temp dir, ports and processes (`RayNode`).

Used by the job-submission, fault-tolerance and topology tests. What makes it safe on a shared machine:
- every port is a free one picked here, and `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` makes Ray use
  the loopback address as the node IP, so nothing listens beyond 127.0.0.1;
- token authentication is on, with a token this module writes into the head's own temp dir
  (`RAY_AUTH_TOKEN_PATH`), so clients need `RAY_AUTH_MODE=token` exactly as on a real cluster
  and the user's `~/.ray/auth_token` is neither read nor written;
- stopping never runs `ray stop` (that stops every Ray cluster of the user on the machine): the
  head runs with `--block` in its own session and is sent SIGTERM, then every process whose
  environment names this head's temp dir (raylet, GCS, workers, drivers started here) is killed
  by its pid; if pytest itself is killed, the kernel's parent-death signal stops the head.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from simpsons.cluster import free_ports

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the head, `ray job submit` and the job's `python` all come from here


def _die_with_parent(sig: int):
    """preexec_fn: the kernel sends `sig` to the child if this (pytest) process dies first, so a
    killed test run does not leave a Ray head behind (Linux; elsewhere nothing)."""

    def set_parent_death_signal() -> None:
        if sys.platform.startswith("linux"):
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # 1 = PR_SET_PDEATHSIG

    return set_parent_death_signal


def popen_group(cmd: list[str], env: dict, cwd: Path, stdout, death_signal: int | None, **popen) -> subprocess.Popen:
    """`cmd` in a session (process group) of its own, its stderr into `stdout`; with `death_signal`
    it gets that signal when this process dies first."""
    preexec_fn = None if death_signal is None else _die_with_parent(death_signal)
    return subprocess.Popen(
        cmd,
        env=env,
        cwd=cwd,
        stdout=stdout,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=preexec_fn,
        **popen,
    )


def _start_logged(cmd: list[str], env: dict, temp_dir: Path):
    """A Ray node's process, its output into temp_dir/ray_start.log: (the Popen, the open log)."""
    log = open(temp_dir / "ray_start.log", "w")
    return popen_group(cmd, env, temp_dir, log, signal.SIGTERM), log


def _log_tail(temp_dir: Path, chars: int) -> str:
    try:
        return (temp_dir / "ray_start.log").read_text()[-chars:]
    except OSError:
        return ""


# What keeps a test's training run small (its images are packed at 40 px).
TINY_RUN = {
    "data.stored_size": 40,
    "data.train_size": 32,
    "optim.batch_size": 32,
    "train.cpus_per_worker": 1,
    "train.histogram_every": 0,
}


# Two Train workers on the CPU with TINY_RUN's image and batch sizes, as `key=value` overrides.
TWO_CPU_WORKERS = [
    "data.stored_size=40",
    "data.train_size=32",
    "optim.batch_size=32",
    "optim.warmup_epochs=0.5",
    "train.workers=2",
    "train.cpus_per_worker=1",
    "train.use_gpu=false",
]

# The training job on the smoke config, as a command after `python`.
SMOKE_TRAIN = ("jobs/train.py", "--config", "configs/smoke.yaml")


def sets(values: dict) -> list[str]:
    """`--set key=value` flags for a job's command line, in order."""
    return [flag for key, value in values.items() for flag in ("--set", f"{key}={value}")]


def job_submit(job_id: str, *command: str) -> list[str]:
    """`ray job submit` of `python <command>` from the repo root (the working dir it uploads)."""
    return [
        str(VENV_BIN / "ray"),
        "job",
        "submit",
        "--submission-id",
        job_id,
        "--working-dir",
        ".",
        "--",
        "python",
        *command,
    ]


def kill_all(pids: list[int]) -> None:
    """SIGKILL each process that still exists."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Process:
    """A subprocess whose combined output is collected line by line while it runs."""

    def __init__(self, cmd: list[str], env: dict, cwd: Path):
        self.cmd = cmd
        self.lines: list[str] = []
        self.seconds: list[float] = []  # when each line arrived, since the start
        self.started = time.monotonic()
        self.popen = popen_group(cmd, env, cwd, subprocess.PIPE, signal.SIGKILL, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.seconds.append(time.monotonic() - self.started)
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        """All output so far, each line stamped with its arrival time (for reading failures)."""
        return "\n".join(f"[{t:6.1f}s] {line}" for t, line in zip(self.seconds, self.lines))

    def wait_for_line(self, text: str, timeout: float) -> str:
        """The first output line containing `text`; fails if the process ends or time runs out first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            if self.popen.poll() is not None:
                self._reader.join(5)
                break
            time.sleep(0.05)
        raise AssertionError(
            f"{text!r} did not appear in the output of {' '.join(self.cmd[:4])} ...:\n{self.output[-6000:]}"
        )

    def wait(self, timeout: float) -> int:
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{' '.join(self.cmd[:4])} ... still running after {timeout:.0f} s:\n{self.output[-6000:]}"
            ) from None
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(10)


# Everything a Ray node listens on besides the head's own ports, given explicitly so that two
# nodes on one machine never clash: the RayParams field tests/ray_node.py passes (a second node)
# and the `ray start` flag that sets it (the head; scripts.py maps the agent's grpc port to
# metrics_agent_port).
_NODE_PORTS = {
    "node_manager_port": "--node-manager-port",
    "object_manager_port": "--object-manager-port",
    "dashboard_agent_listen_port": "--dashboard-agent-listen-port",
    "metrics_agent_port": "--dashboard-agent-grpc-port",
    "runtime_env_agent_port": "--runtime-env-agent-port",
    "metrics_export_port": "--metrics-export-port",
}


def _pids_with_marker(marker: str) -> list[int]:
    """Live processes whose environment contains `marker` (every Ray process inherits its node's)."""
    needle = marker.encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes():  # empty for zombies
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


class RayHead:
    """`autoscaling_config`: a cluster launcher config whose provider is Ray's fake multi-node one
    (tests/autoscaling.py builds it): the head then runs Ray's own autoscaler, which starts worker
    nodes as local processes with the resources their node type declares. `env`: variables every
    process of the cluster (job drivers included) gets, e.g. what KubeRay sets in its pods."""

    def __init__(
        self,
        num_cpus: int = 4,
        resources: dict[str, float] | None = None,
        autoscaling_config: dict | None = None,
        env: dict[str, str] | None = None,
    ):
        self.num_cpus = num_cpus
        self.resources = resources or {}
        self.autoscaling_config = autoscaling_config
        self.extra_env = env or {}
        self.nodes: list[RayNode] = []
        # Short path: Ray puts unix sockets under it (limit ~107 characters).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rayhead-", dir="/tmp"))
        self.token_path = self.temp_dir / "auth_token"
        # One batch: picked one by one, two of them can be the same port (seen: the dashboard's and
        # its agent's, and `ray start` refused to start).
        self.gcs_port, self.dashboard_port, client_port, *node_ports = free_ports(3 + len(_NODE_PORTS))
        self._port_flags = [
            f"--ray-client-server-port={client_port}",
            *(f"{flag}={port}" for flag, port in zip(_NODE_PORTS.values(), node_ports)),
        ]
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self._head: subprocess.Popen | None = None
        self._processes: list[Process] = []

    # -- environments -------------------------------------------------------------------------

    def _base_env(self) -> dict:
        # Our own address and token only, whatever another fixture left in this process's environment.
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        env.update(
            PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token_path),
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # nothing to drain: stop at once
            # Ray processes that look the cluster up themselves (Train's placement-group cleaner
            # uses the state API) would otherwise find every Ray instance on the machine and fail,
            # or follow another test's RAY_API_SERVER_ADDRESS to its cluster.
            RAY_ADDRESS=self.address,
            RAY_API_SERVER_ADDRESS=self.dashboard_url,
            PYTHONUNBUFFERED="1",
        )
        if self.autoscaling_config is not None:
            # Ray's fake multi-node provider refuses to start without RAY_FAKE_CLUSTER; its nodes
            # are started by the autoscaler (the monitor process) and inherit this environment.
            env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        env.update(self.extra_env)
        return env

    def job_client_env(self) -> dict:
        """What `ray job submit` needs: the dashboard address and the token (RAY_AUTH_MODE=token)."""
        return dict(self._base_env(), RAY_ADDRESS=self.dashboard_url)

    def driver_env(self) -> dict:
        """What a plain `python jobs/train.py` driver needs to join this cluster."""
        return self._base_env()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 90) -> RayHead:
        self._token = secrets.token_hex(32)  # kept: the tests poll with it
        self.token_path.write_text(self._token)
        self.token_path.chmod(0o600)
        cmd = [
            str(VENV_BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--temp-dir={self.temp_dir}",
            "--node-ip-address=127.0.0.1",
            f"--node-name={self.temp_dir}",  # how node_id_named() tells this node from the others
            f"--port={self.gcs_port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps(self.resources)}",
            "--disable-usage-stats",
            "--min-worker-port=0",
            "--max-worker-port=0",  # random free ports for workers
            *self._port_flags,
        ]
        if self.autoscaling_config is not None:
            config = dict(self.autoscaling_config)
            config["provider"] = dict(config["provider"], gcs_address=self.address)  # else <outward IP>:6379
            path = self.temp_dir / "autoscaling.json"
            path.write_text(json.dumps(config))
            cmd.append(f"--autoscaling-config={path}")
        self._head, self._log = _start_logged(cmd, self._base_env(), self.temp_dir)
        deadline = time.monotonic() + timeout
        while True:
            if self._head.poll() is not None:
                raise RuntimeError(f"ray start --head exited with {self._head.returncode}:\n{self.log_tail()}")
            if self._dashboard_answers():
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"The Ray head did not come up within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.5)

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"}

    def _dashboard_answers(self) -> bool:
        request = urllib.request.Request(f"{self.dashboard_url}/api/jobs/", headers=self._auth())
        try:
            with urllib.request.urlopen(request, timeout=2):
                return True
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """Stop everything this head started, and only that; safe to call more than once."""
        for process in self._processes:
            process.kill()
        for node in self.nodes:
            node.stop()
        if self._head is not None and self._head.poll() is None:
            self._head.send_signal(signal.SIGTERM)  # `ray start --block` drains and stops its node
            try:
                self._head.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self._head.pid, signal.SIGKILL)
                self._head.wait(10)
        kill_all(self.leftover_pids())
        if getattr(self, "_log", None):
            self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def leftover_pids(self) -> list[int]:
        """Live processes whose environment names this head's temp dir (all of them inherit it,
        the processes of the nodes joined to it included)."""
        return _pids_with_marker(str(self.temp_dir))

    def __enter__(self) -> RayHead:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- using it -----------------------------------------------------------------------------

    def spawn(self, cmd: list[str], env: dict) -> Process:
        """Start `cmd` in the repo root; it is killed when the head stops."""
        process = Process(cmd, env, REPO)
        self._processes.append(process)
        return process

    def run(self, cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def add_node(self, num_cpus: int, resources: dict[str, float] | None = None, timeout: float = 120) -> RayNode:
        """Join another Ray node to this head (stopped with the head); returns once the GCS lists it."""
        node = RayNode(self, num_cpus, resources or {})
        self.nodes.append(node)
        node.start(timeout)
        return node

    def state(self, resource: str, **equal: str) -> list[dict]:
        """Ray's state API (`/api/v0/<resource>` on the dashboard, what `ray list` asks), with the
        token, in this process: rows whose fields equal `equal`'s values. A subprocess running
        `ray.util.state` costs seconds of CPU per call, and the tests poll."""
        query = [("limit", "10000"), ("detail", "false")]
        for key, value in equal.items():
            query += [("filter_keys", key), ("filter_predicates", "="), ("filter_values", value)]
        request = urllib.request.Request(
            f"{self.dashboard_url}/api/v0/{resource}?{urllib.parse.urlencode(query)}", headers=self._auth()
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            reply = json.load(response)
        assert reply["result"], f"the state API refused {resource} {equal}: {reply['msg']}"
        return reply["data"]["result"]["result"]

    def live_nodes(self) -> list[dict]:
        """The cluster's live nodes: [{node_id, node_name (a RayHead's or RayNode's temp dir), resources}]."""
        return [
            {"node_id": n["node_id"], "node_name": n["node_name"], "resources": n["resources_total"]}
            for n in self.state("nodes", state="ALIVE")
        ]

    def node_id_named(self, temp_dir: Path) -> str:
        """The id of the live node named after `temp_dir` (a RayHead's or RayNode's), "" before it joins."""
        return next((n["node_id"] for n in self.state("nodes", state="ALIVE", node_name=str(temp_dir))), "")

    def node_id_of_head(self) -> str:
        return self.node_id_named(self.temp_dir)

    def actors(self, class_name: str, **equal: str) -> list[dict]:
        """Actors of a class (any state unless `state=` says), through Ray's state API:
        [{actor_id, pid, node_id, state}]."""
        return [
            {key: actor[key] for key in ("actor_id", "pid", "node_id", "state")}
            for actor in self.state("actors", class_name=class_name, **equal)
        ]

    def train_workers(self) -> list[dict]:
        """Live Ray Train worker actors: [{actor_id, pid, node_id, state}]."""
        return self.actors("RayTrainWorker", state="ALIVE")

    def wait_for_train_workers(self, count: int, timeout: float = 180) -> list[dict]:
        """The live Ray Train workers once there are `count` of them (0: a run's group has gone)."""
        deadline = time.monotonic() + timeout
        while True:
            workers = self.train_workers()
            if len(workers) == count:
                return workers
            assert time.monotonic() < deadline, f"expected {count} live Train workers, the state API lists {workers}"
            time.sleep(1)

    def log_tail(self, chars: int = 4000) -> str:
        return _log_tail(self.temp_dir, chars)


class RayNode:
    """A Ray node joined to a RayHead, as on a worker machine (tests/ray_node.py: what `ray start
    --address=<head> --block` runs), with a temp dir, ports and processes of its own.

    `kill()` is a node loss: every process of the node (the `ray start` process, its raylet and
    agents, and the workers it runs) is SIGKILLed by pid, found through a marker in their
    environment that every one of them inherits.
    """

    def __init__(self, head: RayHead, num_cpus: int, resources: dict[str, float]):
        self.head, self.num_cpus, self.resources = head, num_cpus, resources
        self.temp_dir = Path(tempfile.mkdtemp(prefix="raynode-", dir="/tmp"))  # short: unix sockets go under it
        self.node_id = ""
        self._process: subprocess.Popen | None = None

    def start(self, timeout: float) -> None:
        env = dict(self.head._base_env(), SIMPSONS_TEST_RAY_NODE=str(self.temp_dir))
        spec = {
            "gcs_address": self.head.address,
            "temp_dir": str(self.temp_dir),
            "num_cpus": self.num_cpus,
            "resources": self.resources,
            "node_name": str(self.temp_dir),
            "ports": dict(zip(_NODE_PORTS, free_ports(len(_NODE_PORTS)))),
        }
        cmd = [str(VENV_BIN / "python"), str(Path(__file__).with_name("ray_node.py")), json.dumps(spec)]
        self._process, self._log = _start_logged(cmd, env, self.temp_dir)
        deadline = time.monotonic() + timeout
        while not self.node_id:
            if self._process.poll() is not None:
                raise RuntimeError(f"The Ray node exited with {self._process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"The Ray node did not join within {timeout:.0f} s:\n{self.log_tail()}")
            self.node_id = self.head.node_id_named(self.temp_dir)
            if not self.node_id:
                time.sleep(0.2)

    def pids(self) -> list[int]:
        return _pids_with_marker(f"SIMPSONS_TEST_RAY_NODE={self.temp_dir}")

    def kill(self) -> None:
        """The node is lost: every one of its processes dies at once, with no chance to clean up."""
        kill_all(self.pids())
        if self._process is not None:
            self._process.wait(10)

    def stop(self) -> None:
        self.kill()
        if getattr(self, "_log", None):
            self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def log_tail(self, chars: int = 4000) -> str:
        return _log_tail(self.temp_dir, chars)
