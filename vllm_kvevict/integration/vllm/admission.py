"""Per-request overrides are checked where vLLM admits a request, in the API-server process.

`InputProcessor._validate_params` is where vLLM rejects bad SamplingParams with a
`VLLMValidationError`, which the OpenAI server answers with HTTP 400 before the request reaches the
engine. We wrap it (once, at class level) to validate the `kv_*` keys of `extra_args` (the body's
`vllm_xargs`) against the server's config. Nothing of a rejected request reaches the scheduler.
"""

from __future__ import annotations

from vllm_kvevict.core.requests import server_config
from vllm_kvevict.integration.vllm.engine_config import kv_requested
from vllm_kvevict.integration.vllm.settings import bad_field, validate_request

_MARK = "_kvevict_wrapped"


def install() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.platforms import current_platform
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor._validate_params
    if getattr(original, _MARK, False):
        return

    def _validate_params(self, params, *args, **kwargs):
        result = original(self, params, *args, **kwargs)
        if isinstance(params, SamplingParams) and params.extra_args:
            server = getattr(self, "_kvevict_server_config", None)
            if server is None:  # parsed once per InputProcessor, not per request
                server = self._kvevict_server_config = server_config(self.vllm_config.additional_config)
                self._kvevict_enabled = current_platform.is_cpu() or kv_requested(self.vllm_config.additional_config)
            try:
                validate_request(
                    server, params.extra_args, eager=bool(self.vllm_config.model_config.enforce_eager),
                    enabled=self._kvevict_enabled,
                )
            except ValueError as exc:
                field = bad_field(str(exc))
                raise VLLMValidationError(
                    str(exc),
                    parameter=f"vllm_xargs.{field}" if field else "vllm_xargs",
                    value=params.extra_args.get(field) if field else None,
                ) from None
        return result

    setattr(_validate_params, _MARK, True)
    InputProcessor._validate_params = _validate_params
