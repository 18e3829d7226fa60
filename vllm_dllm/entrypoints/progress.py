"""vLLM's offline progress bar, with tokens per forward: `use_tqdm=dllm_progress(llm)`.

`LLM.generate(..., use_tqdm=factory)` builds its bar with `factory` and, after each finished
request, sets the bar's postfix to its token rates and calls `update`. The forwards a request
took only exist in its `RequestOutput.kv_transfer_params["dllm"]`, which the bar never sees,
so for the bar's lifetime the engine's `step` is wrapped (on that engine object only) to add
up the finished requests' statistics, and `update` appends them to vLLM's postfix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm


def dllm_progress(llm: Any) -> Callable[..., tqdm]:
    """A `use_tqdm` factory for `llm` (a `vllm.LLM`) whose bar shows tokens per forward."""

    def factory(*args: Any, **kwargs: Any) -> tqdm:
        return _DllmBar(llm.llm_engine, *args, **kwargs)

    return factory


class _DllmBar(tqdm):
    def __init__(self, engine: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._engine = engine
        self._tokens = 0
        self._forwards = 0
        step = engine.step

        def step_and_count() -> list[Any]:
            outputs = step()
            for output in outputs:
                stats = (getattr(output, "kv_transfer_params", None) or {}).get("dllm")
                if output.finished and stats:
                    self._tokens += stats["output_tokens"]
                    self._forwards += stats["forwards"]
            return outputs

        engine.step = step_and_count

    def update(self, n: float | None = 1) -> bool | None:
        if self._forwards:
            self.postfix = f"{self.postfix}, {self._tokens / self._forwards:.2f} tokens/forward"
        return super().update(n)

    def close(self) -> None:
        # Only the wrapper was set on the instance: removing it restores the engine's method.
        self._engine.__dict__.pop("step", None)
        super().close()
