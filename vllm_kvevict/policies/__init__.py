"""The policy library: pure torch + stdlib, no vLLM (DESIGN.md section 4).

One module per method; every `Policy` subclass with a name is registered (`registry.POLICIES`).
"""

from vllm_kvevict.policies.config import PolicyConfig
from vllm_kvevict.policies.plan import KeepPlan, LayerView
from vllm_kvevict.policies.registry import POLICIES, PolicySpec, get_spec

__all__ = ["POLICIES", "KeepPlan", "LayerView", "PolicyConfig", "PolicySpec", "get_spec"]
