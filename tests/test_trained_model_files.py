"""The shipped trained checkpoint ``models/llada-arith``: layout and a real answer.

Fast and vLLM-free. The engine loads this directory exactly as it loads a released LLaDA repo,
so these tests pin what that relies on: the released config.json keys, the released tensor
names, a tokenizer that ``AutoTokenizer`` loads offline and that maps one character to one id,
special-token ids that agree between config and tokenizer, and bf16 weights (as released) with
the whole directory under the 10 MB budget. The last test decodes ``123+989=`` with the
plain-torch loop of the training script, so a checkpoint overwritten by an untrained one fails
here too, not only in the engine test.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors import safe_open

from tests.scripts import load_example
from vllm_dllm.model_executor.models.transformer_shape import TransformerShape
from vllm_dllm.testing.chat_templates import LLADA_CHAT_TEMPLATE
from vllm_dllm.testing.checkpoints import TinyCheckpoint, llada_config_dict

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO / "models" / "llada-arith"
FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "README.md",
]


def _config() -> dict:
    return json.loads((MODEL_DIR / "config.json").read_text())


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201  (transformers' tokenizer class varies by version)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MODEL_DIR), local_files_only=True)


@pytest.fixture(scope="module")
def train_module() -> ModuleType:
    return load_example("train_tiny_llada")


def test_files_present_and_small() -> None:
    for name in FILES:
        assert (MODEL_DIR / name).is_file(), name
    assert sum(f.stat().st_size for f in MODEL_DIR.iterdir()) <= 10_000_000


def test_config_has_the_released_llada_keys() -> None:
    cfg = _config()
    # Same keys, in the same order, as the shared builder of released-layout configs.
    body = TransformerShape(
        hidden_size=cfg["d_model"],
        num_heads=cfg["n_heads"],
        num_kv_heads=cfg["n_kv_heads"],
        num_layers=cfg["n_layers"],
        intermediate_size=cfg["mlp_hidden_size"],
        vocab_size=cfg["vocab_size"],
        rms_norm_eps=cfg["rms_norm_eps"],
        rope_theta=cfg["rope_theta"],
        max_position=cfg["max_sequence_length"],
        qkv_bias=False,
    )
    ids = {"<|endoftext|>": cfg["eos_token_id"], "<|mdm_mask|>": cfg["mask_token_id"]}
    assert list(cfg) == list(llada_config_dict(TinyCheckpoint(body, ids)))
    assert cfg["architectures"] == ["LLaDAModelLM"] and cfg["model_type"] == "llada"
    assert cfg["d_model"] // cfg["n_heads"] == 64  # a head size vLLM's CPU attention supports
    assert cfg["vocab_size"] == cfg["embedding_size"]
    assert cfg["weight_tying"] is False and cfg["include_bias"] is False


def test_plugin_config_class_reads_it() -> None:
    from vllm_dllm.transformers_utils.configs.llada import LLaDAConfig

    cfg = LLaDAConfig.from_pretrained(str(MODEL_DIR))
    raw = _config()
    assert cfg.head_dim == 64
    assert cfg.num_attention_heads == cfg.num_key_value_heads == raw["n_heads"]
    assert cfg.intermediate_size == raw["mlp_hidden_size"]
    assert cfg.vocab_size == raw["vocab_size"]


def test_tensor_names_shapes_and_dtype() -> None:
    cfg = _config()
    d, f, v = cfg["d_model"], cfg["mlp_hidden_size"], cfg["vocab_size"]
    expected = {"model.transformer.wte.weight": (v, d), "model.transformer.ln_f.weight": (d,)}
    expected["model.transformer.ff_out.weight"] = (v, d)
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        expected |= {p + n + ".weight": (d, d) for n in ("q_proj", "k_proj", "v_proj")}
        expected |= {p + "attn_out.weight": (d, d), p + "ff_out.weight": (d, f)}
        expected |= {p + "ff_proj.weight": (f, d), p + "up_proj.weight": (f, d)}
        expected |= {p + "attn_norm.weight": (d,), p + "ff_norm.weight": (d,)}
    with safe_open(str(MODEL_DIR / "model.safetensors"), framework="pt") as fh:
        assert set(fh.keys()) == set(expected)
        for name, shape in expected.items():
            t = fh.get_tensor(name)
            assert tuple(t.shape) == shape, name
            assert t.dtype == torch.bfloat16, name


def test_tokenizer_is_character_level_with_bos(tokenizer) -> None:  # noqa: ANN001
    cfg = _config()
    text = "123+989="
    ids = tokenizer(text)["input_ids"]
    # vLLM tokenizes completion prompts with add_special_tokens=True: BOS, then one id per char.
    assert ids[0] == tokenizer.bos_token_id and len(ids) == len(text) + 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(tokenizer.encode("rev(a b)=", add_special_tokens=False)) == "rev(a b)="
    assert len(tokenizer) == cfg["vocab_size"]
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == cfg["eos_token_id"]
    assert tokenizer.convert_tokens_to_ids("<|mdm_mask|>") == cfg["mask_token_id"]


def test_chat_template_is_llada_style(tokenizer) -> None:  # noqa: ANN001
    assert tokenizer.chat_template == LLADA_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "123+989="}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n123+989=<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_answers_the_demo_prompt(train_module: ModuleType, tokenizer) -> None:  # noqa: ANN001
    model = train_module.load_checkpoint(MODEL_DIR)
    gen_len = train_module.TrainConfig().gen_len
    prompt = tokenizer("123+989=")["input_ids"]
    with torch.no_grad():
        answers, _, _ = train_module.diffusion_generate(model, [prompt], gen_len, gen_len)
    assert train_module.decode_ids(answers[0]) == "1112"


def test_lm_eval_task_holds_the_held_out_problems(train_module: ModuleType) -> None:
    """The lm-evaluation-harness task's data are the held-out problems the model card scores
    (the training script's own set), with their tasks, prompts and answers."""
    data = REPO / "examples" / "lm_eval" / "llada_arith" / "heldout.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    expected = train_module.heldout_set(400, train_module.EVAL_SEED, train_module.TrainConfig())
    assert rows == [{"task": e.task, "prompt": e.prompt, "answer": e.answer} for e in expected]
    task = (data.parent / "llada_arith.yaml").read_text()
    assert "max_gen_toks: 16" in task and "exact_match" in task
