"""Greedy generation in a fresh process; JSON spec on stdin, token ids (JSON) on the last stdout line.

spec["stock"]: the caller set VLLM_PLUGINS="" and we check our backend is really absent; otherwise
we check it is present.
"""

import json
import sys


def main() -> None:
    spec = json.loads(sys.stdin.read())
    import vllm.plugins
    from vllm import LLM, SamplingParams
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    vllm.plugins.load_general_plugins()
    ours = "kvevict" in AttentionBackendEnum.CPU_ATTN.get_path()
    assert ours != spec["stock"], f"plugin loaded={ours}, expected stock={spec['stock']}"
    llm = LLM(spec["model"], **spec["engine"])
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"])
    outs = llm.generate(spec["prompts"], params, use_tqdm=False)
    print(json.dumps([list(o.outputs[0].token_ids) for o in outs]))


if __name__ == "__main__":
    main()
