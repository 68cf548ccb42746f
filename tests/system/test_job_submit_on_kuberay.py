"""A job submitted without a working dir, as KubeRay's RayJob submits it: it runs where
`ray start` ran (the image's WORKDIR), on a real Ray head."""

from __future__ import annotations

from ray_head import VENV_BIN, RayHead


def test_a_job_submitted_without_a_working_dir_runs_where_ray_start_ran():
    # What the relative entrypoint relies on: KubeRay submits it with no working_dir, and the head's
    # `ray start` runs in the container's working directory. A real head, started in its temp dir,
    # and a submission from the repo root: the job sees the head's directory, not the client's.
    with RayHead(num_cpus=1) as head:
        done = head.run(
            [str(VENV_BIN / "ray"), "job", "submit", "--", "python", "-c", "import os; print('cwd=' + os.getcwd())"],
            head.job_client_env(),
            timeout=240,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert f"cwd={head.temp_dir.resolve()}" in done.stdout, done.stdout[-3000:]
