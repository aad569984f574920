"""How the plugin configures vLLM on CUDA, checked here with vLLM's own config objects (no GPU needed):
TRITON_ATTN is selected (and a forced other backend refused), our GPU worker runs vLLM's V1 model runner,
and vLLM's default CUDA graphs degrade to piecewise ones (attention eager) while eviction is configured."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def cpu_config():
    """A real VllmConfig of the default model (built on this CPU machine)."""
    from vllm.engine.arg_utils import EngineArgs

    from tests.e2e.engine import model_path

    def build(**kwargs):
        args = EngineArgs(model=model_path(), dtype="float32", enforce_eager=True, max_model_len=1024, **kwargs)
        return args.create_engine_config()

    return build


@pytest.fixture
def as_cuda(monkeypatch):
    """engine_config.configure sees a CUDA platform. Our plugin registers its attention backend once per
    process, for the platform it sees then: it is loaded first, on the real (CPU) one, or a later CPU engine
    in this process would run vLLM's own CPU_ATTN, without eviction."""
    from vllm.platforms import current_platform
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self=None: False)


def test_a_kv_setting_on_cuda_selects_triton_attention_our_worker_and_scheduler(cpu_config, as_cuda):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_kvevict.integration.vllm import engine_config

    config = cpu_config(additional_config={"kv_evict": {"policy": "ada-snapkv", "budget": 256}})
    config.parallel_config.worker_cls = "auto"
    config.scheduler_config.scheduler_cls = None
    config.attention_config.backend = None
    engine_config.configure(config)
    assert config.attention_config.backend == AttentionBackendEnum.TRITON_ATTN
    assert config.parallel_config.worker_cls == engine_config.GPU_WORKER_CLS
    assert config.scheduler_config.scheduler_cls == engine_config.SCHEDULER_CLS


def test_without_a_kv_setting_cuda_runs_vllm_as_shipped(cpu_config, as_cuda):
    from vllm_kvevict.integration.vllm import engine_config

    config = cpu_config()
    config.parallel_config.worker_cls = "auto"
    config.scheduler_config.scheduler_cls = None
    config.attention_config.backend = None
    engine_config.configure(config)
    assert config.parallel_config.worker_cls == "auto" and config.scheduler_config.scheduler_cls is None
    assert config.attention_config.backend is None and "kv_evict" not in config.additional_config


def test_a_forced_other_attention_backend_is_refused_naming_the_fix(cpu_config, as_cuda):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_kvevict.integration.vllm import engine_config

    config = cpu_config(additional_config={"kv_evict": {"policy": "snapkv"}})
    config.attention_config.backend = AttentionBackendEnum.FLASH_ATTN
    with pytest.raises(ValueError, match="--attention-backend FLASH_ATTN was given: drop that flag"):
        engine_config.configure(config)


def test_v1_model_runner_is_forced_unless_v2_was_asked_for(monkeypatch):
    from vllm_kvevict.integration.vllm.engine_config import _force_v1_model_runner

    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    _force_v1_model_runner()
    import os

    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(ValueError, match="VLLM_USE_V2_MODEL_RUNNER='1'"):
        _force_v1_model_runner()


def test_eviction_turns_full_cuda_graphs_into_piecewise_ones(cpu_config):
    """Our builder reports NEVER while a KV setting is configured (attention must run eagerly, in Python);
    vLLM then resolves its default FULL_AND_PIECEWISE to PIECEWISE. Without one it reports ALWAYS."""
    from vllm.config import CompilationConfig, CUDAGraphMode
    from vllm.config.compilation import CompilationMode
    from vllm.v1.attention.backend import AttentionCGSupport

    from vllm_kvevict.integration.vllm.triton_backend import KVEvictTritonMetadataBuilder

    configured = cpu_config(additional_config={"kv_evict": {"policy": "snapkv"}})
    plain = cpu_config()
    plain.additional_config.pop("kv_evict")  # on CPU the plugin always writes one; on CUDA only when given
    assert KVEvictTritonMetadataBuilder.get_cudagraph_support(configured, None) == AttentionCGSupport.NEVER
    assert KVEvictTritonMetadataBuilder.get_cudagraph_support(plain, None) == AttentionCGSupport.ALWAYS
    compilation = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE)
    compilation.set_splitting_ops_for_v1(all2all_backend="", data_parallel_size=1)
    mode = compilation.resolve_cudagraph_mode_and_sizes(AttentionCGSupport.NEVER, "KVEvictTritonBackend")
    assert mode == CUDAGraphMode.PIECEWISE and compilation.splitting_ops_contain_attention()


def test_a_server_without_kv_setting_answers_overrides_with_the_fix():
    from vllm_kvevict.integration.vllm.settings import validate_request
    from vllm_kvevict.policies.config import PolicyConfig

    with pytest.raises(ValueError, match="need a server started with a KV setting"):
        validate_request(PolicyConfig(), {"kv_policy": "tokenselect"}, enabled=False)
    assert validate_request(PolicyConfig(), {"temperature": 1}, enabled=False).policy == "none"


# ---- the CPU switch for the same path ---------------------------------------------------------------
def _python(code: str, **env) -> "subprocess.CompletedProcess":
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_triton_on_cpu_needs_the_interpreter_and_to_come_before_vllm():
    install = "from vllm_kvevict.integration.vllm.triton_on_cpu import install; install()"
    off = _python(install, TRITON_INTERPRET="0")
    assert off.returncode != 0 and "set TRITON_INTERPRET=1" in off.stderr
    late = _python("import vllm.engine.arg_utils; " + install, TRITON_INTERPRET="1")
    assert late.returncode != 0 and "must be installed before vLLM is imported" in late.stderr
    ok = _python(install + "; import vllm.triton_utils as t, torch; print(t.HAS_TRITON, torch.cuda.get_device_capability())",
                 TRITON_INTERPRET="1")
    assert ok.returncode == 0 and ok.stdout.split()[-3:] == ["True", "(9,", "0)"], ok.stderr[-2000:]


def test_the_switch_without_its_shims_is_a_clear_start_up_error(monkeypatch):
    from vllm_kvevict import envs
    from vllm_kvevict.integration.vllm import engine_config

    monkeypatch.setenv("VLLM_KVEVICT_BACKEND", "triton")
    with pytest.raises(ValueError, match="needs the Triton-on-CPU shims installed before vLLM is imported"):
        engine_config._check_cpu_backend()
    monkeypatch.setenv("VLLM_KVEVICT_BACKEND", "cuda")
    with pytest.raises(ValueError, match="VLLM_KVEVICT_BACKEND='cuda' is invalid: expected one of auto, triton"):
        envs.backend()


def test_gpu_check_refuses_clearly_without_a_gpu(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PY": sys.executable, "OUT": str(tmp_path / "out")})
    assert proc.returncode == 2 and "no CUDA GPU visible to torch" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written
