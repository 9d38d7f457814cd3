# dsm-stt server on the CPU: PyTorch's CPU wheels (no CUDA libraries), the model's weights in a
# mounted cache. Build and run (see README.md, "Docker"):
#
#   docker build -t dsm-stt .
#   docker run --rm -p 8080:8080 -v dsm-stt-cache:/data dsm-stt
#
# The first start downloads kyutai/stt-1b-en_fr-candle (about 2 GB) into the volume; later starts
# load it from there. Arguments after the image name replace the default command, e.g.
#   docker run --rm -p 8080:8080 dsm-stt serve --host 0.0.0.0 --random-weights --model tiny

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# Where PyTorch's CPU-only wheels come from (build arguments, to pin or mirror them).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# g++ compiles this package's CPU kernels (int8 products, fused layer step) on first use, for
# the CPU the container runs on (-march=native); without it the server still runs, on
# PyTorch's own int8 products. The build lands in /data, so it happens once per volume.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

# A virtual environment: the same steps work on Debian's own python3 (PEP 668) and on the
# official Python images.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# torch first, from the CPU index, so that installing the project finds it satisfied and
# pulls no CUDA wheels
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /opt/dsm-stt
COPY pyproject.toml README.md LICENSE ./
COPY dsm_stt ./dsm_stt
RUN pip install . && dsm-stt --version

# An unprivileged user; /data holds the Hugging Face cache (HF_HOME) and the compiled kernels.
# /data is writable by every user (sticky, like /tmp), so --user "$(id -u):$(id -g)" with a
# host directory mounted at /data/huggingface works too; a named volume copies these modes.
RUN useradd --create-home --uid 1000 dsm && mkdir -p /data && chown dsm:dsm /data \
    && chmod 1777 /data
USER dsm
ENV HF_HOME=/data/huggingface \
    TORCH_EXTENSIONS_DIR=/data/torch_extensions
VOLUME ["/data"]

EXPOSE 8080
# /health answers 200 once the model is loaded and warmed up (a first download takes minutes)
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4)"]
ENTRYPOINT ["dsm-stt"]
CMD ["serve", "--host", "0.0.0.0"]
