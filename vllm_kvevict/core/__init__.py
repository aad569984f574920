"""The backend-neutral eviction core: between the policies and the vLLM shell, no vLLM import.

    requests.py    which policy a request runs and its block plan (scheduler and worker agree by it)
    step.py        one engine step: per batch row, the request and what its policy does this step
    state.py       per-request state a worker keeps between steps, and what it reports
    eviction.py    the step's plan and the physical metadata rewrite; what each layer does around the
                   backend's attention kernel
    compaction.py  compacting one request's layer
    adapter.py     the cache-layout adapters: the only code that touches a backend's KV memory

The core reads what policies declare (`policies/declaration.py`), never their names.
"""
