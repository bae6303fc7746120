# Grand-Challenge inference container for FuseMyCells: /input -> /output, no network.
# Torch (CUDA build) comes from the base image; requirements.txt must not reinstall it.
# BASE_IMAGE can be overridden (tests build this file on a local CPU stand-in).
# torch 2.13.0, the version the whole test suite runs (requirements-dev.txt, the
# stand-in's wheel): what ships is what is tested. CUDA 12.6 as before (any driver
# >= 525 through CUDA minor-version compatibility; a T4 works); the 2.13.0 tag is
# referenced by public Dockerfiles, one of them a Grand-Challenge algorithm.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/app

# One layer for the non-root `user` (uid 1001) and the dependencies (under the
# vfs storage driver each layer is a full copy). The constraint pins the base
# image's torch: a requirement that wants another torch fails the build instead
# of silently replacing the CUDA build.
COPY requirements.txt /tmp/requirements.txt
RUN groupadd -r -g 1001 user \
 && useradd -m --no-log-init -r -u 1001 -g user user \
 && python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/constraints.txt \
 && python -m pip install --no-cache-dir -c /tmp/constraints.txt -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt /tmp/constraints.txt \
 && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# Weights change less often than code: copy them first for the layer cache.
COPY --chown=user:user resources/ /opt/app/resources/
COPY --chown=user:user fmc/ /opt/app/fmc/
COPY --chown=user:user inference.py /opt/app/

# The numeric id of `user`: runtimes can check it is not root without /etc/passwd.
USER 1001:1001
ENTRYPOINT ["python", "inference.py"]
