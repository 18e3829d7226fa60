"""Send a model card's generation call, as a request, to `vllm-dllm serve`.

Each supported family's model card (or release script) shows one generation call; `CARDS` holds
the request that does the same (the README's "The model cards, side by side" table). Start a
server on a checkpoint of the family, for example a tiny random one in the released layout:

    python -m vllm_dllm.testing.checkpoints dream /tmp/tiny-dream
    VLLM_CPU_KVCACHE_SPACE=1 vllm-dllm serve /tmp/tiny-dream --dtype float32 --max-model-len 1024

then run:

    python examples/model_cards.py dream [--base-url http://localhost:8000/v1] [--max-tokens 64]

`--max-tokens` scales the card's generation length (and a per-generation step count with it)
down for small machines; the other settings are the card's. A tiny random checkpoint answers
nonsense: the point is that the server accepts and runs exactly the card's settings.
"""

from __future__ import annotations

import argparse
from typing import Any

from openai import OpenAI

#: LLaDA's generate() from its release, which LLaDA-MoE's card uses unchanged.
LLADA_CARD: dict[str, Any] = {
    "call": "generate(model, input_ids, steps=128, gen_length=128, block_length=32, "
    "temperature=0., cfg_scale=0., remasking='low_confidence')",
    "max_tokens": 128,
    "fields": {"temperature": 0.0},
    "xargs": {"dllm_steps": 128, "dllm_block_length": 32, "dllm_cache": "none",
              "dllm_remasking": "low_confidence"},  # fmt: skip
    "steps_per_generation": True,
}

#: family -> the card's call, its generation length, and the equivalent request fields.
CARDS: dict[str, dict[str, Any]] = {
    "llada": LLADA_CARD,
    "dream": {
        "call": "model.diffusion_generate(input_ids, max_new_tokens=512, steps=512, "
        "temperature=0.2, top_p=0.95, alg='entropy', alg_temp=0.)",
        "max_tokens": 512,
        "fields": {"temperature": 0.2, "top_p": 0.95},
        "xargs": {"dllm_alg": "entropy", "dllm_alg_temp": 0.0, "dllm_steps": 512},
        "steps_per_generation": True,
    },
    "llada_moe": LLADA_CARD,
    "diffucoder": {
        "call": "model.diffusion_generate(input_ids, attention_mask=attention_mask, "
        "max_new_tokens=256, steps=256, temperature=0.4, top_p=0.95, alg='entropy', "
        "alg_temp=0.)",
        "max_tokens": 256,
        "fields": {"temperature": 0.4, "top_p": 0.95},
        "xargs": {"dllm_alg": "entropy", "dllm_alg_temp": 0.0, "dllm_steps": 256},
        "steps_per_generation": True,
    },
    "dream_coder": {
        "call": "model.diffusion_generate(input_ids, max_new_tokens=512, steps=512, "
        "temperature=0.1, top_p=1.0, alg='entropy', alg_temp=0.0, eos_penalty=3.0) "
        "(eos_penalty is not offered)",
        "max_tokens": 512,
        "fields": {"temperature": 0.1, "top_p": 1.0},
        "xargs": {"dllm_alg": "entropy", "dllm_alg_temp": 0.0, "dllm_steps": 512},
        "steps_per_generation": True,
    },
    "fast_dllm_v2": {
        "call": "model.generate(input_ids, tokenizer=tokenizer, max_new_tokens=512, "
        "small_block_size=8, threshold=0.9)",
        "max_tokens": 512,
        "fields": {"temperature": 0.0},
        "xargs": {"dllm_sub_block_length": 8, "dllm_threshold": 0.9},
    },
    "sdar": {
        "call": "python generate.py --block_length 4 --denoising_steps 4 --temperature 1.0 "
        "--top_k 0 --top_p 1.0 --remasking_strategy low_confidence_dynamic "
        "--confidence_threshold 0.85",
        "max_tokens": 512,
        "fields": {"temperature": 1.0, "top_p": 1.0},
        "xargs": {"dllm_block_length": 4, "dllm_steps": 4,
                  "dllm_remasking": "low_confidence_dynamic", "dllm_threshold": 0.85},  # fmt: skip
    },
    "llada2": {
        "call": "model.generate(inputs=input_ids, eos_early_stop=True, gen_length=512, "
        "block_length=32, steps=32, temperature=0.0)",
        "max_tokens": 512,
        "fields": {"temperature": 0.0},
        "xargs": {"dllm_block_length": 32, "dllm_steps": 32},
    },
    "llada2.1": {
        "call": "LLaDA2Pipeline(...)(prompt, gen_length=256, block_length=32, "
        "num_inference_steps=32, threshold=0.7, editing_threshold=0.5, max_post_steps=16, "
        "temperature=0.0)",
        "max_tokens": 256,
        "fields": {"temperature": 0.0},
        "xargs": {"dllm_block_length": 32, "dllm_threshold": 0.7,
                  "dllm_editing_threshold": 0.5, "dllm_max_post_steps": 16},  # fmt: skip
    },
}


def card_request(family: str, max_tokens: int | None) -> tuple[int, dict, dict]:
    """(max_tokens, request fields, vllm_xargs) of a family's card, scaled to `max_tokens`."""
    card = CARDS[family]
    tokens = max_tokens or card["max_tokens"]
    xargs = dict(card["xargs"])
    if card.get("steps_per_generation"):
        # Steps over the whole generation keep the card's steps per token.
        xargs["dllm_steps"] = max(1, xargs["dllm_steps"] * tokens // card["max_tokens"])
    return tokens, dict(card["fields"]), xargs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("family", choices=sorted(CARDS), help="the served checkpoint's family")
    parser.add_argument("--base-url", default="http://localhost:8000/v1",
                        help="the server's OpenAI API root (default: %(default)s)")  # fmt: skip
    parser.add_argument("--model", default=None,
                        help="served model name (default: the server's only model)")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="generation length (default: the card's)")  # fmt: skip
    parser.add_argument("--prompt", default="Why is the sky blue?")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="unused")
    model = args.model or client.models.list().data[0].id
    max_tokens, fields, xargs = card_request(args.family, args.max_tokens)
    print(f"model card: {CARDS[args.family]['call']}")
    print(f"request:    max_tokens={max_tokens} {fields} vllm_xargs={xargs}")
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": args.prompt}],
        max_tokens=max_tokens,
        seed=0,
        extra_body={"vllm_xargs": xargs},
        **fields,
    )
    print("answer:    ", repr(chat.choices[0].message.content))
    print("statistics:", chat.model_extra["kv_transfer_params"]["dllm"])


if __name__ == "__main__":
    main()
