"""Functions that run inside an engine's worker process, sent there by `LLM.collective_rpc`.

They read or wrap the worker's own objects (the model body, the denoiser), so tests can check
what happens where the denoising step actually runs.
"""

from __future__ import annotations

from typing import Any

import torch

#: Tensor methods that read a tensor's values on the host: on a GPU each one waits for the
#: device to finish (a synchronisation).
HOST_READS = ("cpu", "item", "tolist", "__bool__", "__int__", "__float__", "__index__")


def body_compilation(worker: Any) -> tuple[bool, bool]:
    """(vLLM compiles the model body, the body has been compiled and run)."""
    body = worker.model_runner.get_model().model
    return not body.do_not_compile, bool(getattr(body, "compiled", False))


def model_contract(worker: Any) -> tuple[str, int, int]:
    """(model class, `mask_token_id`, `logits_shift`): what the denoiser reads from the model."""
    model = worker.model_runner.get_model()
    return type(model).__name__, model.mask_token_id, model.logits_shift


def start_counting_host_reads(worker: Any) -> None:
    """Wrap the denoiser's step so that every host read of a tensor during it is recorded."""
    denoiser = worker.denoiser
    original = denoiser.step
    records: list[tuple[int, list[str]]] = []

    def counting_step(scheduler_output: Any) -> Any:
        calls: list[str] = []
        originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

        def recording(name: str, method: Any) -> Any:
            def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                calls.append(name)
                return method(self, *args, **kwargs)

            return wrapper

        for name, method in originals.items():
            setattr(torch.Tensor, name, recording(name, method))
        try:
            return original(scheduler_output)
        finally:
            for name, method in originals.items():
                setattr(torch.Tensor, name, method)
            records.append((len(scheduler_output.num_scheduled_tokens), calls))

    denoiser.step = counting_step
    worker.dllm_host_reads = records


def stop_counting_host_reads(worker: Any) -> list[tuple[int, list[str]]]:
    """Restore the step; return (requests in the step, host reads) for every step run."""
    del worker.denoiser.step  # the instance attribute shadowed the class's method
    return worker.dllm_host_reads


def start_counting_cuda_syncs(worker: Any) -> None:
    """Wrap the denoiser's step in `torch.cuda.set_sync_debug_mode("warn")`, which warns at every
    operation that makes the host wait for the GPU, and record those warnings per step."""
    import warnings

    denoiser = worker.denoiser
    original = denoiser.step
    records: list[tuple[int, list[str]]] = []

    def counting_step(scheduler_output: Any) -> Any:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return original(scheduler_output)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
                records.append((len(scheduler_output.num_scheduled_tokens), syncs))

    denoiser.step = counting_step
    worker.dllm_cuda_syncs = records


def stop_counting_cuda_syncs(worker: Any) -> list[tuple[int, list[str]]]:
    """Restore the step; return (requests in the step, synchronizing operations) per step."""
    del worker.denoiser.step
    return worker.dllm_cuda_syncs


def start_recording_batches(worker: Any) -> None:
    """Wrap the denoiser's step so that the requests of every step are recorded, in order."""
    denoiser = worker.denoiser
    original = denoiser.step
    batches: list[list[str]] = []

    def recording_step(scheduler_output: Any) -> Any:
        if scheduler_output.num_scheduled_tokens:
            batches.append(list(scheduler_output.num_scheduled_tokens))
        return original(scheduler_output)

    denoiser.step = recording_step
    worker.dllm_batches = batches


def stop_recording_batches(worker: Any) -> list[list[str]]:
    """Restore the step; return the request ids of every step run since the start."""
    del worker.denoiser.step  # the instance attribute shadowed the class's method
    return worker.dllm_batches
