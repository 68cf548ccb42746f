# The image every node of the Ray cluster runs (cluster.yaml, docker.image): Ray 2.60 on Python 3.11
# with CUDA 12.8, PyTorch built for CUDA 12.8, and this project installed.
#
#   docker build -t 123456789012.dkr.ecr.us-west-2.amazonaws.com/simpsons-train:0.1.0 .
#   docker push 123456789012.dkr.ecr.us-west-2.amazonaws.com/simpsons-train:0.1.0
#
# Replace 123456789012 and us-west-2 with your AWS account id and region (create the ECR repository
# `simpsons-train` first), and keep the tag equal to the project version in pyproject.toml.
# cluster.yaml names exactly this image; tests/test_cluster_config.py checks that they agree.
# The image was not built where this project was written and tested (no Docker engine there), so the
# base and wheel tags below were not pulled; `docker build` is their first check.

# Pinned by version: Ray 2.60.0, Python 3.11, CUDA 12.8 (the -gpu alias would move with Ray's
# default CUDA). rayproject/ray-ml stops at 2.49, so PyTorch is installed below.
FROM rayproject/ray:2.60.0-py311-cu128

# The base image's non-root user (it owns the image's Python); every step below runs as it.
USER ray

# PyTorch wheels for the base image's CUDA 12.8; exact versions, the ones the project is tested with.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
RUN pip install --no-cache-dir --index-url ${TORCH_INDEX_URL} torch==2.14.1 torchvision==0.29.1

# Stream print() to `ray job logs` as it happens.
ENV PYTHONUNBUFFERED=1

WORKDIR /home/ray/simpsons

# Dependencies first, from pyproject.toml alone, so that editing the code does not reinstall them.
# The torch above and the base image's ray already satisfy their requirements and stay as they are.
COPY --chown=ray:users pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt "torch==2.14.1" "torchvision==0.29.1" \
    && rm /tmp/requirements.txt

# Then the source: the package (installed, not editable) and the job entry points and configs, so
# `python jobs/train.py --config configs/cluster.yaml` also works inside the image without a working dir.
COPY --chown=ray:users simpsons/ simpsons/
COPY --chown=ray:users jobs/ jobs/
COPY --chown=ray:users configs/ configs/
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import simpsons.train, ray, torch; print('simpsons on ray', ray.__version__, 'torch', torch.__version__, 'CUDA', torch.version.cuda)"
