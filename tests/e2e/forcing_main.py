"""Teacher forcing through vLLM in a fresh process; prints one JSON line.

Scores a natural-text continuation two ways on the full cache: with our ForceTokens logits processor
(the forced tokens' raw logprobs while decoding) and with vLLM's prompt logprobs of prompt +
continuation. The two must agree: that is what makes `eval`'s ppl task valid after compaction.
"""

import json
import sys

from vllm_kvevict.eval.engine import FORCE_KEY, cpu_defaults, make_llm


def main() -> None:
    spec = json.loads(sys.stdin.read())
    cpu_defaults(1)
    from vllm import SamplingParams, TokensPrompt

    from vllm_kvevict.eval.tasks import hf_builder, make_sample

    llm = make_llm(spec["model"], max_model_len=1024, force_tokens=True)
    s = make_sample(hf_builder(llm.get_tokenizer()), "ppl", 600, None, 0, seed=1, continuation=24)
    prompt, cont = list(s.prompt_ids), list(s.continuation_ids)
    forced = SamplingParams(temperature=0.0, max_tokens=len(cont), ignore_eos=True, logprobs=1,
                            extra_args={"kv_policy": "none", FORCE_KEY: cont})
    prompt_lp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, extra_args={"kv_policy": "none"})
    a, b = llm.generate([TokensPrompt(prompt_token_ids=prompt), TokensPrompt(prompt_token_ids=prompt + cont)],
                        [forced, prompt_lp], use_tqdm=False)
    out = a.outputs[0]
    print(json.dumps({
        "forced_ids": list(out.token_ids), "cont": cont,
        "forced_lp": [entry[t].logprob for t, entry in zip(cont, out.logprobs)],
        "prompt_lp": [entry[t].logprob for t, entry in zip(cont, b.prompt_logprobs[len(prompt):])],
    }))


if __name__ == "__main__":
    main()
