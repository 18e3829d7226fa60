"""The model cards' generation settings as requests: accepted by every family, and the Dream
card (`diffusion_generate(steps, temperature=0.2, top_p=0.95, alg="entropy", alg_temp=0.)`)
served end to end through `vllm-dllm serve` and the `openai` client (`examples/model_cards.py`).
"""

from __future__ import annotations

import subprocess
import sys

import openai
import pytest
from vllm import SamplingParams

from tests.engines import server_args
from tests.scripts import EXAMPLES, load_example
from tests.server import Server
from vllm_dllm.config import parse_dllm_params
from vllm_dllm.families import BIDIRECTIONAL, fast_dllm_v2, llada2, sdar

FAMILIES = {
    "llada": BIDIRECTIONAL,
    "dream": BIDIRECTIONAL,
    "llada_moe": BIDIRECTIONAL,
    "diffucoder": BIDIRECTIONAL,
    "dream_coder": BIDIRECTIONAL,
    "fast_dllm_v2": fast_dllm_v2(32),
    "sdar": sdar(4),
    "llada2": llada2(32),
    "llada2.1": llada2(32),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_card_request_is_valid_for_its_family(family):
    cards = load_example("model_cards")
    max_tokens, fields, xargs = cards.card_request(family, None)
    params = parse_dllm_params(xargs, max_tokens, family=FAMILIES[family])
    assert params.max_tokens == max_tokens
    # The card's sampling fields are vLLM's own, which the denoiser implements.
    SamplingParams(max_tokens=max_tokens, extra_args=xargs, **fields)


@pytest.fixture(scope="module")
def dream_server(dream_tiny_dir, tmp_path_factory):
    server = Server(dream_tiny_dir, server_args("tiny-dream"),
                    tmp_path_factory.mktemp("dream_server") / "server.log")  # fmt: skip
    server.wait_ready()
    yield server
    server.stop()


@pytest.mark.server
def test_dream_card_served_end_to_end(dream_server, dream_engine):
    script = subprocess.run(
        [sys.executable, str(EXAMPLES / "model_cards.py"), "dream", "--base-url",
         f"{dream_server.url}/v1", "--max-tokens", "24"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert script.returncode == 0, script.stderr
    assert "alg='entropy'" in script.stdout and "statistics:" in script.stdout
    # The same request through the client equals the offline engine, token for token.
    cards = load_example("model_cards")
    max_tokens, fields, xargs = cards.card_request("dream", 24)
    client = openai.OpenAI(base_url=f"{dream_server.url}/v1", api_key="unused", max_retries=0)
    response = client.completions.create(
        model="tiny-dream", prompt="The sky is", max_tokens=max_tokens, seed=5,
        extra_body={"vllm_xargs": xargs, "return_token_ids": True, "ignore_eos": True},
        **fields,
    )  # fmt: skip
    (offline,) = dream_engine.generate(
        ["The sky is"],
        SamplingParams(max_tokens=max_tokens, seed=5, ignore_eos=True, extra_args=xargs,
                       **fields),  # fmt: skip
        use_tqdm=False,
    )
    assert response.choices[0].model_extra["token_ids"] == list(offline.outputs[0].token_ids)
    stats = response.model_extra["kv_transfer_params"]["dllm"]
    # Dream's schedule over the card's steps (= max_new_tokens): at most that many forwards.
    assert stats["output_tokens"] == max_tokens and 1 < stats["forwards"] <= max_tokens
