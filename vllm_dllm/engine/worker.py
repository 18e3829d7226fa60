"""Workers that run the denoising step instead of vLLM's token-by-token `execute_model`.

Model loading, KV-cache sizing and allocation, attention backends and distributed set-up stay
vLLM's (the platform's own worker and model runner); only `execute_model` is ours. One class per
platform because `worker_cls` names a concrete class.
"""

from __future__ import annotations

from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_worker import Worker

from vllm_dllm.engine.denoiser import Denoiser


class DllmWorkerMixin:
    _denoiser: Denoiser | None = None

    @property
    def denoiser(self) -> Denoiser:
        if self._denoiser is None:
            # Built on first use: the KV cache exists only after the engine's start-up profiling.
            self._denoiser = Denoiser(self.model_runner)  # type: ignore[attr-defined]
        return self._denoiser

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.denoiser.step(scheduler_output)

    def dllm_score(
        self, token_ids: list[int], windows: list[tuple[int, ...]]
    ) -> list[list[list[float]]]:
        """`LLM.collective_rpc("dllm_score", args=(ids, windows))`: see `Denoiser.score`."""
        return [logits.tolist() for logits in self.denoiser.score(token_ids, windows)]


class DllmCPUWorker(DllmWorkerMixin, CPUWorker):
    pass


class DllmGPUWorker(DllmWorkerMixin, Worker):
    pass
