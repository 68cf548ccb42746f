# The image every node of the Ray cluster runs (cluster.yaml, docker.image): Ray 2.60 on Python 3.11,
# PyTorch 2.14.1 built for CUDA 13.0, and this project installed.
#
#   docker build -t 123456789012.dkr.ecr.us-west-2.amazonaws.com/simpsons-train:0.1.0 .
#       (with --build-arg SIMPSONS_COMMIT=$(git rev-parse --short=12 HEAD) checkpoints name the commit)
#   docker push 123456789012.dkr.ecr.us-west-2.amazonaws.com/simpsons-train:0.1.0
#
# Replace 123456789012 and us-west-2 with your AWS account id and region (create the ECR repository
# `simpsons-train` first), and keep the tag equal to the project version in pyproject.toml.
# cluster.yaml names exactly this image; tests/test_cluster_config.py checks that they agree and
# runs hadolint on this file.
# The image was not built where this project was written and tested (no Docker engine there), so the
# base and wheel tags below were not pulled; `docker build` is their first check, and its last step
# fails the build if torch is not the CUDA build asked for or pip finds a broken requirement.

# Pinned by version: Ray 2.60.0, Python 3.11 (the -gpu alias would move with Ray's default CUDA).
# The base's own CUDA (12.8) does not constrain torch: rayproject/ray-ml stops at 2.49, so PyTorch
# is installed below as wheels that bundle their own CUDA runtime.
FROM rayproject/ray:2.60.0-py311-cu128

# The base image's non-root user `ray` (uid 1000) and its group `users` (gid 100), as Ray's
# docker/base-deps/Dockerfile creates them; it owns the image's Python and every step below runs as
# it. Numeric, so that a host or Kubernetes' runAsNonRoot can tell it is not root without the
# image's /etc/passwd.
USER 1000:100

# PyTorch's CUDA build, chosen from torch_cuda.toml (the variants PyTorch publishes for 2.14: cu126,
# cu130, cu132), not from the base image. cu130 is the build on PyPI that the project is tested
# with; it needs an NVIDIA driver >= 580 on the GPU nodes (cluster.yaml, ImageId).
ARG TORCH_CUDA=cu130
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/${TORCH_CUDA} \
        torch==2.14.1 torchvision==0.29.1

# The NVIDIA container runtime refuses to start this image on a node whose driver cannot run the
# CUDA of the torch build above (13.0: driver >= 580, torch_cuda.toml), with a message naming the
# requirement, instead of a container that advertises GPUs and fails at its first CUDA call. It
# replaces the base image's cuda>=12.8; keep it equal to TORCH_CUDA (tests/test_cluster_config.py).
ENV NVIDIA_REQUIRE_CUDA="cuda>=13.0"

# Stream print() to `ray job logs` as it happens.
ENV PYTHONUNBUFFERED=1

# The commit the image is built from (docker build --build-arg SIMPSONS_COMMIT=$(git rev-parse
# --short=12 HEAD)): the image has no .git, and checkpoints record the code version from this.
ARG SIMPSONS_COMMIT=""
ENV SIMPSONS_COMMIT=${SIMPSONS_COMMIT}

# Made by the ray user, not by WORKDIR: the legacy builder creates a missing WORKDIR as root, and
# `pip install .` below writes its build files into this folder.
RUN mkdir -p /home/ray/simpsons
WORKDIR /home/ray/simpsons

# Dependencies first, from pyproject.toml alone, so that editing the code does not reinstall them.
# The torch above and the base image's ray already satisfy their requirements and stay as they are.
# With them the `mlflow` extra: MLflow's client, for run.tracking_uri (docs/tracking.md).
COPY --chown=1000:100 pyproject.toml README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['mlflow']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt torch==2.14.1 torchvision==0.29.1 \
    && rm /tmp/requirements.txt

# Then the source: the package (installed, not editable) and the job entry points and configs, so
# `python jobs/train.py --config configs/cluster.yaml` also works inside the image without a working dir.
COPY --chown=1000:100 simpsons/ simpsons/
COPY --chown=1000:100 jobs/ jobs/
COPY --chown=1000:100 configs/ configs/
RUN pip install --no-cache-dir --no-deps .

# Ray Serve's HTTP proxy (simpsons/serve.py; deploy/k8s/rayservice.yaml routes to it).
EXPOSE 8000

# Last: fail the build, not the first GPU job, if a later install replaced torch with another CUDA
# build (cu130 -> torch.version.cuda "13.0") or left a requirement broken; batch prediction and
# the endpoint import Ray Data and Ray Serve, so their extras are checked too.
RUN python -c "import sys, torch, ray, simpsons.driver, simpsons.label, simpsons.serve; cuda = '${TORCH_CUDA}'[2:]; want = cuda[:-1] + '.' + cuda[-1]; \
print('simpsons on ray', ray.__version__, 'torch', torch.__version__, 'CUDA', torch.version.cuda); \
sys.exit(0 if torch.version.cuda == want else f'torch is built for CUDA {torch.version.cuda}, not {want}')" \
    && pip check
