# Serving image: the official vLLM OpenAI server of the pinned version, plus this plugin.
# Build: docker build -t vllm-kvevict .   Run: docker run --gpus all -p 8000:8000 vllm-kvevict MODEL [flags]
ARG VLLM_VERSION=v0.32.0
FROM vllm/vllm-openai:${VLLM_VERSION}
COPY pyproject.toml README.md /opt/vllm-kvevict/
COPY vllm_kvevict /opt/vllm-kvevict/vllm_kvevict
COPY kernels /opt/vllm-kvevict/kernels
COPY configs /opt/vllm-kvevict/configs
# --no-deps: the image already has torch, pyyaml and the matching vLLM; never let pip swap them
RUN pip install --no-cache-dir --no-deps /opt/vllm-kvevict
ENTRYPOINT ["vllm", "serve"]
