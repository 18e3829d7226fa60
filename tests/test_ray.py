"""Ray: the plugin in fresh Ray worker processes, the Ray-executor configuration of
examples/multi_gpu.py, and the two Ray deployments of examples/ on a local cluster.

vLLM's Ray executor does not run on the CPU platform (no Ray device key), so a tensor-parallel
engine under Ray cannot start here; what it depends on is checked instead: vLLM builds the
Ray-backed configuration with the plugin's scheduler and worker, the job's `runtime_env` reaches
the configuration vLLM hands to its Ray workers, and vLLM's plugin loader runs in a fresh Ray
worker, including for a plugin that only the job's `runtime_env` installed (a probe wheel
shipped the way docs/scaling.md ships vllm-dllm to nodes that lack it).

The deployments run for real: the data-parallel batch job (2 engine actors) must give exactly
one engine's tokens, and the Ray Serve deployment of vLLM's OpenAI server must answer the
`openai` client with the offline engine's tokens. One local cluster (`num_cpus=2`) serves the
whole module; each deployment shuts its engines down before the next starts.
"""

from __future__ import annotations

import base64
import hashlib
import os
import sys
import time
import zipfile
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="needs the ray extra: pip install -e '.[ray]'")

import openai  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

from tests import scripts  # noqa: E402
from tests.engines import IN_PROCESS_ENV, MAX_MODEL_LEN, server_args  # noqa: E402
from tests.server import assert_completion_equals_offline, free_port  # noqa: E402

pytestmark = pytest.mark.ray

# The session's TP=1 engines use these settings (tests/engines.py); the replicas must match.
ENGINE_KWARGS = dict(
    dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN, max_num_seqs=32, seed=0
)
PROBE_PLUGIN = "dllm_ray_probe_plugin"


def load_example(name: str):
    """Import examples/NAME.py; Ray ships its classes and functions to workers by value."""
    module = scripts.load_example(name)
    ray.cloudpickle.register_pickle_by_value(module)
    return module


def write_probe_plugin_wheel(directory: Path) -> Path:
    """A wheel holding a one-function vLLM general plugin (entry point and all), standing in
    for a vllm-dllm wheel shipped to nodes through `runtime_env["py_modules"]`."""
    dist_info = f"{PROBE_PLUGIN}-0.0.1.dist-info"
    files = {
        f"{PROBE_PLUGIN}/__init__.py": "CALLS = []\n\ndef register():\n    CALLS.append(1)\n",
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {PROBE_PLUGIN.replace('_', '-')}\nVersion: 0.0.1\n"
        ),
        f"{dist_info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: vllm-dllm-tests\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n"
        ),
        f"{dist_info}/entry_points.txt": (
            f"[vllm.general_plugins]\nray_probe = {PROBE_PLUGIN}:register\n"
        ),
    }
    record = []
    for name, text in files.items():
        digest = hashlib.sha256(text.encode()).digest()
        b64 = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        record.append(f"{name},sha256={b64},{len(text.encode())}")
    files[f"{dist_info}/RECORD"] = "\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n"
    wheel = directory / f"{PROBE_PLUGIN}-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return wheel


@pytest.fixture(scope="module")
def ray_cluster(engine_pool, llada_tiny_dir, tmp_path_factory):
    """A local Ray cluster whose job `runtime_env` is the one examples/multi_gpu.py builds.

    Started after the session's TP=1 LLaDA engine (the pool's `llada`, which the tests here use)
    so that engine is not built in a Ray-initialised process. Ray's runtime-env agent installs
    py_modules wheels with the `pip` on its PATH: this venv's comes first.
    """
    engine_pool.engine("llada", llada_tiny_dir)
    multi_gpu = load_example("multi_gpu")
    wheel = write_probe_plugin_wheel(tmp_path_factory.mktemp("probe_wheel"))
    runtime_env = multi_gpu.ray_runtime_env(
        plugin_wheel=str(wheel), env_vars={"VLLM_DLLM_RAY_TEST": "1"}
    )
    old_path = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{old_path}"
    try:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            runtime_env=runtime_env,
            log_to_driver=False,
        )
    finally:
        os.environ["PATH"] = old_path
    yield runtime_env
    ray.shutdown()


def test_plugin_registers_in_fresh_ray_worker(ray_cluster):
    """vLLM's plugin loader, run in a new Ray worker process, registers the architectures and
    the engine hook, and also loads a plugin that only the job's runtime_env installed."""

    @ray.remote(num_cpus=0)
    class PluginProbe:
        def check(self) -> dict:
            imported_before = sorted(
                m for m in sys.modules if m.split(".")[0] in ("vllm", "vllm_dllm", PROBE_PLUGIN)
            )
            from vllm.model_executor.models.config import MODELS_CONFIG_MAP
            from vllm.plugins import load_general_plugins

            load_general_plugins()
            from vllm import ModelRegistry
            from vllm.utils.import_utils import resolve_obj_by_qualname

            from vllm_dllm.engine.config_hook import CPU_WORKER_CLS, GPU_WORKER_CLS

            probe = sys.modules.get(PROBE_PLUGIN)
            return {
                "pid": os.getpid(),
                "imported_before": imported_before,
                "archs": sorted(ModelRegistry.get_supported_archs()),
                "hooks": {a: MODELS_CONFIG_MAP[a].__name__ for a in ("LLaDAModelLM", "DreamModel")},
                "workers": [
                    resolve_obj_by_qualname(c).__name__ for c in (CPU_WORKER_CLS, GPU_WORKER_CLS)
                ],
                "probe_calls": len(probe.CALLS) if probe else 0,
                "probe_file": getattr(probe, "__file__", None),
                "env": os.environ.get("VLLM_DLLM_RAY_TEST"),
            }

    actor = PluginProbe.remote()
    try:
        found = ray.get(actor.check.remote(), timeout=300)
    finally:
        ray.kill(actor)
    assert found["pid"] != os.getpid()
    assert found["imported_before"] == []  # a fresh process: nothing of vLLM or ours loaded
    assert {"LLaDAModelLM", "DreamModel"} <= set(found["archs"])
    assert found["hooks"] == {"LLaDAModelLM": "DllmEngineConfig", "DreamModel": "DllmEngineConfig"}
    assert found["workers"] == ["DllmCPUWorker", "DllmGPUWorker"]
    # The shipped wheel was installed for the job (not in this venv); vLLM called its entry point.
    assert found["probe_calls"] == 1
    assert "runtime_resources" in found["probe_file"]
    assert found["env"] == "1"


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_multi_gpu_example_ray_configuration(ray_cluster, family, request):
    """examples/multi_gpu.py's Ray configuration is valid: vLLM builds it (no engine start)
    with its Ray executor, the plugin's scheduler and worker, and the job's runtime_env."""
    multi_gpu = load_example("multi_gpu")
    checkpoint = request.getfixturevalue(f"{family}_tiny_dir")
    kwargs = multi_gpu.engine_kwargs(
        str(checkpoint),
        tensor_parallel_size=2,
        backend="ray",
        dtype="float32",
        max_model_len=MAX_MODEL_LEN,
        enforce_eager=True,
    )
    config = multi_gpu.build_config(kwargs)
    described = multi_gpu.describe(config)
    assert described["architecture"] == {"llada": "LLaDAModelLM", "dream": "DreamModel"}[family]
    assert described["tensor_parallel_size"] == described["world_size"] == 2
    assert described["distributed_executor_backend"] == "ray"
    assert described["executor"].startswith("Ray")
    # On this CPU machine the plugin picks its CPU worker; on GPUs, DllmGPUWorker.
    assert described["worker_cls"] == "vllm_dllm.engine.worker.DllmCPUWorker"
    assert described["scheduler_cls"] == "vllm_dllm.engine.scheduler.DllmScheduler"
    assert described["enable_prefix_caching"] is False
    assert described["async_scheduling"] is False
    # vLLM starts its Ray workers with the job's runtime_env (the shipped wheel, env_vars).
    worker_env = dict(config.parallel_config.ray_runtime_env)
    assert worker_env["env_vars"]["VLLM_DLLM_RAY_TEST"] == "1"
    job_env = ray.get_runtime_context().runtime_env  # the wheel, uploaded by ray.init
    assert worker_env["py_modules"] == job_env["py_modules"]
    assert [m.endswith(".whl") for m in worker_env["py_modules"]] == [True]


BATCH_PROMPTS = [
    [17, 101, 42],
    "The quick brown fox",
    [5, 9, 200, 13, 77, 64, 33, 120, 2, 250, 31],
    "Diffusion models",
    [300, 4, 4, 18],
]
BATCH_SAMPLING = [
    {"max_tokens": 24, "temperature": 0.0, "extra_args": extra}
    for extra in (
        {"dllm_cache": "dual", "dllm_block_length": 8, "dllm_threshold": 0.9},
        {"dllm_cache": "prefix", "dllm_block_length": 8, "dllm_factor": 1.0},
        {"dllm_cache": "none", "dllm_block_length": 8, "dllm_steps": 24},
        {"dllm_cache": "dual", "dllm_block_length": 8, "dllm_threshold": 0.5},
        {"dllm_cache": "dual", "dllm_block_length": 24, "dllm_threshold": 0.9},
    )
]


def test_batch_job_equals_single_engine(ray_cluster, llada_tiny_dir, llada_engine):
    """examples/ray_batch.py: 2 engine actors, prompts split between them, results in order,
    exactly one engine's tokens."""
    ray_batch = load_example("ray_batch")
    results = ray_batch.run_batch(
        BATCH_PROMPTS,
        BATCH_SAMPLING,
        model=str(llada_tiny_dir),
        num_replicas=2,
        engine_kwargs=ENGINE_KWARGS,
        # Each actor's engine core and worker in the actor's process (vLLM's single-process
        # engine, see `tests.engines.start_engine`): on CPU each would import vLLM again.
        actor_options=ray_batch.replica_options(
            cpu=True, runtime_env={"env_vars": IN_PROCESS_ENV}
        ),
    )
    expected = llada_engine.generate(
        [TokensPrompt(prompt_token_ids=p) if isinstance(p, list) else p for p in BATCH_PROMPTS],
        [SamplingParams(**s) for s in BATCH_SAMPLING],
        use_tqdm=False,
    )
    assert len(results) == len(BATCH_PROMPTS)
    for result, output in zip(results, expected, strict=True):
        assert result["token_ids"] == list(output.outputs[0].token_ids)
        assert result["text"] == output.outputs[0].text
        assert result["dllm"] == output.kv_transfer_params["dllm"]
    assert len({r["replica"] for r in results}) == 2  # both replicas did work


SERVED_MODEL = "tiny-llada"
XARGS = {"dllm_block_length": 8, "dllm_cache": "dual", "dllm_threshold": 0.5}


@pytest.fixture(scope="module")
def serve_url(ray_cluster, llada_tiny_dir):
    """examples/ray_serve.py's application (one CPU replica) on a free loopback port."""
    from ray import serve

    ray_serve = load_example("ray_serve")
    port = free_port()
    # Serve waits 60 s for its HTTP proxy actor; a busy 2-core machine can take longer to
    # start one.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("ray.serve._private.api.HTTP_PROXY_TIMEOUT", 300)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    vllm_args = [str(llada_tiny_dir), *server_args(SERVED_MODEL)]
    try:
        serve.run(ray_serve.build_app(vllm_args, cpu=True), name="vllm-dllm", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        while True:
            try:
                client.models.list()
                break
            except openai.APIError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield url
    finally:
        serve.shutdown()


def test_serve_answers_openai_completion(serve_url, llada_engine):
    client = openai.OpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [SERVED_MODEL]
    prompt = "The quick brown fox"
    assert_completion_equals_offline(client, SERVED_MODEL, llada_engine, prompt, XARGS)
    # vLLM's own validation still turns a bad diffusion parameter into a 400.
    with pytest.raises(openai.BadRequestError, match="dllm_threshold"):
        client.completions.create(
            model=SERVED_MODEL,
            prompt=prompt,
            max_tokens=8,
            extra_body={"vllm_xargs": {"dllm_threshold": 2.0}},
        )
