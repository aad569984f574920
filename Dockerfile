# Serving image (CUDA): the official vLLM OpenAI server of the pinned version, plus this plugin.
#   docker build -t vllm-kvevict:0.1.0 .
#   docker run --gpus all -p 8000:8000 vllm-kvevict:0.1.0 MODEL --kv-config /opt/vllm-kvevict/configs/snapkv.yaml
# The entrypoint is `vllm serve`: arguments are the model and its flags, the KV policy included
# (--kv-policy/--kv-budget, or --kv-config with a preset; deploy/k8s mounts one from a ConfigMap).
# Dockerfile.cpu is the CPU twin. The plugin supports exactly vLLM 0.32, hence the literal tag.
FROM vllm/vllm-openai:v0.32.0

# `vllm-kvevict model` (the Kubernetes initContainer) converts a GGUF file and needs gguf and
# accelerate, which vLLM does not pull in; versions as in requirements/cpu.lock. --no-deps: their own
# dependencies (numpy, torch, huggingface_hub, ...) are vLLM's and must not be swapped.
RUN python3 -m pip install --no-cache-dir --no-deps gguf==0.19.0 accelerate==1.15.0

COPY pyproject.toml README.md /opt/vllm-kvevict/
COPY vllm_kvevict /opt/vllm-kvevict/vllm_kvevict
COPY configs /opt/vllm-kvevict/configs
# --no-deps: the image already has torch, pyyaml and the matching vLLM; never let pip swap them
RUN python3 -m pip install --no-cache-dir --no-deps /opt/vllm-kvevict \
    && groupadd --gid 10001 kvevict \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin kvevict

# Unprivileged at run time (the base runs as root); deploy/k8s runs the same uid (runAsUser 10001).
# vLLM, torch and Triton write their caches under $HOME.
USER 10001
ENV HOME=/home/kvevict
WORKDIR /home/kvevict

EXPOSE 8000
# For `docker run` only (Kubernetes ignores it and probes /health itself). Assumes the default
# --port 8000; the long start period covers loading the model.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["vllm", "serve"]
