"""Start the real OpenAI-compatible server (`vllm-dllm serve`) as a subprocess for tests."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests

from tests.engines import IN_PROCESS_ENV


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_completion_equals_offline(
    client, model: str, llm, prompt: str, xargs: dict, offline_xargs: dict | None = None
) -> None:
    """A server completion with `xargs` equals the offline engine's output with `offline_xargs`
    (default: the same; they differ by the server's defaults): text, token ids, statistics."""
    from vllm import SamplingParams

    response = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=24,
        temperature=0,
        extra_body={"vllm_xargs": xargs, "return_token_ids": True},
    )
    offline_extra = xargs if offline_xargs is None else offline_xargs
    offline = llm.generate(
        [prompt],
        SamplingParams(max_tokens=24, temperature=0, extra_args=offline_extra),
        use_tqdm=False,
    )[0].outputs[0]
    choice = response.choices[0]
    assert choice.text == offline.text
    assert choice.model_extra["token_ids"] == list(offline.token_ids)
    stats = response.model_extra["kv_transfer_params"]["dllm"]
    assert stats["forwards"] >= 1 and stats["output_tokens"] == len(offline.token_ids)


def metric_value(server: Server, name: str, **labels: str) -> float:
    """Sum of the samples of `name` on the server's /metrics whose labels include `labels`."""
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{.*\}})? ([0-9.e+-]+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


class Server:
    """`vllm-dllm serve CHECKPOINT ARGS...` on a free loopback port; logs go to a file.

    `cwd` and `env` (added to this process's environment) serve the tests that start the server
    exactly as the README does: from the repository root, with a relative model path.
    `new_session` puts it in a process group of its own, which a test can signal as a terminal's
    Ctrl-C does (every process of the server at once).

    `worker_in_engine_core` runs the model's one worker inside the engine-core process
    (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, which vLLM's CPU platform needs for its single-process
    executor; the API server still starts the engine core as a process of its own). That is
    the layout of a one-GPU server; on CPU vLLM otherwise spawns a worker process as well, one
    more import of vLLM (about 10 s) per start. The servers started exactly as the README says,
    and the shutdown tests, keep vLLM's CPU layout.
    """

    def __init__(
        self,
        checkpoint: Path,
        args: list[str],
        log_path: Path,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        new_session: bool = False,
        worker_in_engine_core: bool = True,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [
            str(Path(sys.executable).with_name("vllm-dllm")),
            "serve",
            str(checkpoint),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *args,
        ]
        environment = {**os.environ, **(env or {})}
        if worker_in_engine_core:
            environment.update(IN_PROCESS_ENV)
        environment.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=environment,
            cwd=cwd,
            start_new_session=new_session,
        )

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited ({self.process.returncode}):\n{self.log()}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()}")

    def processes(self) -> list[psutil.Process]:
        """The API server process and every process it started (engine core, workers)."""
        root = psutil.Process(self.process.pid)
        return [root, *root.children(recursive=True)]

    def rss_by_process(self) -> dict[str, int]:
        """Resident memory of each of the server's processes, keyed by `"PID NAME"`."""
        out = {}
        for process in self.processes():
            # A helper may exit between listing and reading.
            with contextlib.suppress(psutil.NoSuchProcess):
                out[f"{process.pid} {process.name()}"] = process.memory_info().rss
        return out

    def log(self) -> str:
        return self.log_path.read_text()[-5000:]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()
