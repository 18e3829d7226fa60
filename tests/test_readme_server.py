"""The server as the README starts it, on the bundled model, with `examples/openai_client.py`.

The serve command is read from the README itself, so the two cannot drift apart. It runs from
the repository root (the README's relative model path) on a free port (`--host`/`--port` are
the only flags added). Its log is checked for what a user watching the terminal sees: vLLM's
periodic line with prompt throughput and ours with tokens per forward (interval shortened
through `VLLM_LOG_STATS_INTERVAL`), and a quiet stop.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.scripts import EXAMPLES, load_example
from tests.server import Server

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
#: Held-out problems of the bundled model's three tasks, and the accuracy its card states
#: (99.2 % of 400 at threshold 0.9 with DualCache; this many must be nearly all right).
PROBLEMS = 48
ACCURACY_FLOOR = 0.95


def readme_serve_command() -> tuple[dict[str, str], list[str]]:
    """The README's `[VAR=value ...] vllm-dllm serve models/llada-arith ...` command
    (continuation lines joined): its environment assignments and its argv."""
    pattern = r"^(?:\w+=\S+ )*vllm-dllm serve models/llada-arith(?:.*\\\n)*.*$"
    match = re.search(pattern, README.read_text(), re.MULTILINE)
    assert match, "the README has no serve command for the bundled model"
    words = shlex.split(match.group(0).replace("\\\n", " "))
    first = words.index("vllm-dllm")
    return dict(w.split("=", 1) for w in words[:first]), words[first:]


@pytest.fixture(scope="module")
def readme_server(tmp_path_factory: pytest.TempPathFactory):
    env, command = readme_serve_command()
    assert command[:3] == ["vllm-dllm", "serve", "models/llada-arith"]
    server = Server(
        Path(command[2]),
        command[3:],
        tmp_path_factory.mktemp("readme_server") / "server.log",
        cwd=REPO,
        env={**env, "VLLM_LOG_STATS_INTERVAL": "1"},
        worker_in_engine_core=False,
    )
    server.wait_ready()
    yield server
    server.stop()


def test_openai_client_example_against_the_readme_server(readme_server):
    client = [sys.executable, str(EXAMPLES / "openai_client.py")]
    result = subprocess.run(
        [*client, "--base-url", f"{readme_server.url}/v1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "model: models/llada-arith"
    assert lines[1] == "completion: '1112'"
    assert lines[3] == "chat: '1245'"
    assert lines[4].startswith("stream: '")
    assert "".join(re.findall(r"'([^']*)'", lines[4])) == "24mllv"
    assert lines[5].startswith("stream statistics: {'forwards': ")


def test_the_log_shows_prompt_throughput_and_tokens_per_forward(readme_server):
    for _ in range(3):
        requests.post(
            f"{readme_server.url}/v1/completions",
            json={"model": "models/llada-arith", "prompt": "555+445=", "max_tokens": 16},
            timeout=60,
        ).raise_for_status()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        log = readme_server.log_path.read_text()
        prompt = re.findall(r"Avg prompt throughput: ([0-9.]+) tokens/s", log)
        ours = re.findall(r"vllm-dllm: \d+ requests running, .* tokens per forward, .*", log)
        if any(float(p) > 0 for p in prompt) and ours:
            assert "Unknown vLLM environment variable" not in log
            return
        time.sleep(1)
    pytest.fail(f"no prompt throughput or vllm-dllm line in the log:\n{readme_server.log()}")


def test_no_diffusion_flag_answers_at_the_model_card_s_accuracy(readme_server):
    """The README's command sets no diffusion parameter: the model's own defaults (blocks of 8,
    DualCache, threshold 0.9, from its generation_config.json) make plain completion requests
    score as its card says, at several tokens per forward, and the start-up line says so."""
    assert not any(word.startswith("--dllm") for word in readme_serve_command()[1])
    problems = load_example("eval_llada_arith").heldout(PROBLEMS)
    response = requests.post(
        f"{readme_server.url}/v1/completions",
        json={
            "model": "models/llada-arith",
            "prompt": [p.prompt for p in problems],
            "max_tokens": 16,
            "temperature": 0.0,
        },
        timeout=120,
    )
    response.raise_for_status()
    body = response.json()
    answers = {c["index"]: c["text"] for c in body["choices"]}
    right = sum(answers[i] == p.answer for i, p in enumerate(problems))
    assert right / len(problems) >= ACCURACY_FLOOR, (right, answers)
    stats = [c["dllm"] for c in body["choices"]]
    tokens = sum(s["output_tokens"] for s in stats)
    assert tokens / sum(s["forwards"] for s in stats) > 1.5, stats
    assert (
        "request defaults: dllm_block_length=8 (generation_config.json), dllm_cache=dual "
        "(generation_config.json), dllm_threshold=0.9 (generation_config.json)"
    ) in readme_server.log_path.read_text()


def test_sigterm_stops_quietly(readme_server):
    """Stopping the server (SIGTERM, what Ctrl-C also triggers) exits 0 without the flood of
    leak reports (shared memory, semaphores, triton's nanobind references) it used to print,
    and without vLLM's `EngineDeadError` traceback (its output handler saw the engine core
    exit first; the drain now stops the handler before the engine). The drain itself, with
    requests in flight, is `test_shutdown.py`'s."""
    before = len(readme_server.log_path.read_text().splitlines())
    readme_server.stop()
    after = readme_server.log_path.read_text().splitlines()[before:]
    text = "\n".join(after)
    assert readme_server.process.returncode == 0, text
    assert "leaked" not in text, text
    assert "Traceback" not in text, text
    assert "Application shutdown complete." in text
