"""LLaDA / Dream on several GPUs with vLLM's tensor parallelism: one node, or a Ray cluster.

One node with N GPUs (vLLM's multiprocess backend; no Ray needed):

    python examples/multi_gpu.py GSAI-ML/LLaDA-8B-Instruct --tensor-parallel-size 4

A Ray cluster (vLLM's Ray executor places the N ranks on the cluster's GPUs, across nodes when
one node has too few). Every node needs the same vLLM and vllm-dllm installed, or the plugin
shipped with `--plugin-wheel` (see docs/scaling.md):

    ray start --head --port 6379                    # on the head node
    ray start --address HEAD_IP:6379                # on every other node
    python examples/multi_gpu.py GSAI-ML/LLaDA-8B-Instruct --backend ray --address auto \\
        --tensor-parallel-size 8 [--plugin-wheel dist/vllm_dllm-0.1.0-py3-none-any.whl]

`--dry-run` builds and prints vLLM's configuration for these arguments without starting an
engine or touching a GPU (it works on a CPU machine with the plugin installed):
tests/test_ray.py checks the configuration this way.

Tensor-parallel sizes must divide the attention heads: LLaDA-8B (32 heads) 1, 2, 4, 8, 16, 32;
Dream-7B (28 query / 4 KV heads) 1, 2, 4. Pipeline parallelism is not supported by the plugin's
model classes.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

PROMPTS = ["What is the capital of France?", "Write a haiku about diffusion models."]


def engine_kwargs(
    model: str,
    *,
    tensor_parallel_size: int,
    backend: str = "mp",
    dtype: str = "bfloat16",
    max_model_len: int = 4096,
    **extra: Any,
) -> dict[str, Any]:
    """`vllm.LLM` / `EngineArgs` keyword arguments for a tensor-parallel diffusion engine.

    Nothing diffusion-specific: the plugin configures its scheduler and worker by itself.
    """
    return {
        "model": model,
        "tensor_parallel_size": tensor_parallel_size,
        "distributed_executor_backend": backend,
        "dtype": dtype,
        "max_model_len": max_model_len,
        **extra,
    }


def ray_runtime_env(
    plugin_wheel: str | None = None, env_vars: dict[str, str] | None = None
) -> dict[str, Any]:
    """The `runtime_env` of the job, which vLLM passes on to its Ray workers.

    `plugin_wheel`: a vllm-dllm wheel that Ray installs on every node for this job (for nodes
    that do not have the plugin installed). `env_vars` reach every worker before Python starts
    (vLLM's Ray executor also copies the driver's environment, but only once the worker process
    is running: too late for variables read at start-up such as PYTHONPATH or LD_PRELOAD).
    """
    runtime_env: dict[str, Any] = {}
    if plugin_wheel:
        runtime_env["py_modules"] = [os.path.abspath(plugin_wheel)]
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    return runtime_env


def build_config(kwargs: dict[str, Any]):
    """vLLM's full engine configuration for `kwargs`, without starting anything."""
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(**kwargs).create_engine_config()


def describe(config) -> dict[str, Any]:
    """The parts of a `VllmConfig` that decide how the engine runs, as plain values."""
    from vllm.v1.executor import Executor

    parallel = config.parallel_config
    return {
        "architecture": config.model_config.architecture,
        "tensor_parallel_size": parallel.tensor_parallel_size,
        "world_size": parallel.world_size,
        "distributed_executor_backend": parallel.distributed_executor_backend,
        "executor": Executor.get_class(config).__qualname__,
        "worker_cls": parallel.worker_cls,
        "scheduler_cls": config.scheduler_config.scheduler_cls,
        "enable_prefix_caching": config.cache_config.enable_prefix_caching,
        "async_scheduling": config.scheduler_config.async_scheduling,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=2)
    parser.add_argument("--backend", choices=["mp", "ray"], default="mp")
    parser.add_argument("--address", default=None, help="Ray cluster address (--backend ray)")
    parser.add_argument("--plugin-wheel", help="ship this vllm-dllm wheel to the Ray nodes")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dry-run", action="store_true", help="print the configuration only")
    args = parser.parse_args()

    kwargs = engine_kwargs(
        args.model,
        tensor_parallel_size=args.tensor_parallel_size,
        backend=args.backend,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
    )
    if args.dry_run:
        for key, value in describe(build_config(kwargs)).items():
            print(f"{key:>30}: {value}")
        return

    if args.backend == "ray":
        import ray

        # Connect first: vLLM then reuses this connection and hands the job's runtime_env to
        # every worker it starts.
        ray.init(address=args.address, runtime_env=ray_runtime_env(args.plugin_wheel))

    from vllm import LLM, SamplingParams

    llm = LLM(**kwargs)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=0.0,
        extra_args={"dllm_cache": "dual", "dllm_threshold": 0.9, "dllm_block_length": 32},
    )
    messages = [[{"role": "user", "content": p}] for p in PROMPTS]
    for prompt, output in zip(PROMPTS, llm.chat(messages, params), strict=True):
        stats = output.kv_transfer_params["dllm"]
        print(f"{prompt}\n  -> {output.outputs[0].text!r}\n  {stats}")


if __name__ == "__main__":
    main()
