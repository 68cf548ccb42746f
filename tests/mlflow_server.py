"""`mlflow server` on 127.0.0.1 for the tracking tests, the job runner and the MLflow readers they share."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from ray_head import REPO, VENV_BIN, popen_group

from simpsons.cluster import free_port
from simpsons.names import SCORE

# What a run's best/ leaves in its MLflow run (its checkpoint.pt stays in the run's storage).
BEST_ARTIFACTS = {"metrics.json", "per_class.csv", "confusion.png", "curves.png", "config.yaml", "model.pt2"}


class MlflowServer:
    """`mlflow server` with a SQLite store and S3 artifacts, in a process group of its own; it can be
    stopped and started again on the same port and database (an outage)."""

    def __init__(self, workdir: Path, artifacts: str, s3_endpoint: str, *extra: str, **env: str):
        self.workdir, self.artifacts, self.extra = workdir, artifacts, extra
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        # The server writes artifacts to S3 with boto3: the test's keys and the moto endpoint.
        self.env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, **env}
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> MlflowServer:
        cmd = [
            str(VENV_BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.workdir / 'mlflow.db'}",
            "--artifacts-destination",
            self.artifacts,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            *self.extra,
        ]
        log = open(self.workdir / "server.log", "a")
        self.process = popen_group(cmd, self.env, self.workdir, log, signal.SIGTERM)
        log.close()
        deadline = time.monotonic() + timeout
        while not self.answers():
            assert self.process.poll() is None, f"mlflow server exited: {self.log_tail()}"
            assert time.monotonic() < deadline, f"mlflow server did not answer in {timeout:.0f} s: {self.log_tail()}"
            time.sleep(0.5)
        return self

    def __enter__(self) -> MlflowServer:
        try:
            return self.start()
        except BaseException:  # a server that never answered is stopped too
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)

    def log_tail(self) -> str:
        return (self.workdir / "server.log").read_text()[-3000:]

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.uri)


def job_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def run_job(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# What a run logged, read back through MLflow's client


def runs_tagged(client, experiment: str, tag: str, value: str) -> list:
    """The MLflow runs (active or deleted) of `experiment` whose `tag` is `value`."""
    from mlflow.entities import ViewType

    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    return client.search_runs([found.experiment_id], f"tags.`{tag}` = '{value}'", run_view_type=ViewType.ALL)


def score_steps(client, run_id: str) -> list[int]:
    """The epochs whose val macro-F1 the run has, in order."""
    return sorted(m.step for m in client.get_metric_history(run_id, SCORE))
