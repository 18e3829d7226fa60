"""Train the small masked-diffusion LM shipped as ``models/llada-arith``.

Random weights cannot show what confidence-aware parallel unmasking buys: their confidences are
flat. Real LLaDA / Dream checkpoints cannot be downloaded here. So this script trains, on CPU in
about 35 minutes, a tiny model in the *real* LLaDA architecture and on-disk layout
(``LLaDAModelLM`` config keys, ``model.transformer.*`` tensor names, a ``tokenizer.json`` that
``AutoTokenizer`` loads), on synthetic tasks whose answers mix tokens that can be filled in
parallel (reversal, sorting, EOS padding) with tokens that depend on each other (carries).

Everything is deterministic given ``--seed``: the data stream, the initialisation and the
held-out set (a different seed, and its prompts are excluded from training).

Reproduce the shipped checkpoint (2 CPU cores, see ``models/llada-arith/README.md``)::

    nice -n 10 .venv/bin/python examples/train_tiny_llada.py --out models/llada-arith

Evaluate a saved checkpoint with the plain-torch decoding loop (no vLLM)::

    .venv/bin/python examples/train_tiny_llada.py --eval-only --out models/llada-arith

Objective (LLaDA SFT, the answer region only; the prompt is never masked): the answer padded
with EOS to ``L = gen_len`` tokens, ``k`` of its tokens masked, cross-entropy on the masked tokens
weighted by ``L / k``, summed and divided by ``L``. ``--objective k`` (the default) draws ``k``
uniformly from ``1..L`` and masks exactly ``k`` random positions: the LLaDA paper's equivalent,
lower-variance form of its loss (same expectation). ``--objective t`` is the form of the paper's
main text: ``t ~ U(eps, 1)``, each position masked with probability ``t``, weight ``1 / t``. With
answers this short, ``1 / t`` puts weights up to 1000 on examples with one masked token (the
model card has the sweep that compared the two). At inference the canvas is
``[BOS] prompt [MASK] * L``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing the package

from vllm_dllm.model_executor.models.transformer_shape import (  # noqa: E402  (no vLLM import)
    TransformerShape,
)
from vllm_dllm.testing.chat_templates import LLADA_CHAT_TEMPLATE  # noqa: E402
from vllm_dllm.testing.checkpoints import TinyCheckpoint, llada_config_dict  # noqa: E402

# --------------------------------------------------------------------------------------------
# Tokenizer: one token per character, LLaDA's special-token names.
# --------------------------------------------------------------------------------------------

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MASK = "<|mdm_mask|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
UNK = "<|unk|>"
SPECIALS = [BOS, EOS, MASK, START_HEADER, END_HEADER, EOT, UNK]
# Printable ASCII plus newline: enough for the tasks and for the chat template's own text.
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]
# The embedding has a round number of rows (as LLaDA's 126464) and the tokenizer exactly that
# many ids, so vLLM's `vocab_size` (the logits width) equals the tokenizer's length.
VOCAB_SIZE = 128
RESERVED = [
    f"<|reserved_special_token_{i}|>" for i in range(VOCAB_SIZE - len(SPECIALS) - len(CHARS))
]
VOCAB: dict[str, int] = {tok: i for i, tok in enumerate(SPECIALS + CHARS + RESERVED)}
BOS_ID, EOS_ID, MASK_ID = VOCAB[BOS], VOCAB[EOS], VOCAB[MASK]
EOT_ID = VOCAB[EOT]
END_IDS = (EOS_ID, EOT_ID)
#: The diffusion defaults written into the checkpoint's generation_config.json (see
#: ``save_checkpoint``): what a request gets when it names no ``dllm_*`` parameter.
TRAINED_DEFAULTS = {"dllm_block_length": 8, "dllm_cache": "dual", "dllm_threshold": 0.9}

# LLaDA-8B-Instruct's Llama-3 style chat template (shared with the random tiny checkpoints).
# BOS is written by the template, so chat prompts are tokenized with add_special_tokens=False,
# as vLLM does for chat requests.
CHAT_TEMPLATE = LLADA_CHAT_TEMPLATE


def encode_text(text: str) -> list[int]:
    """Character ids of plain text (no special tokens); the fast path used for training data."""
    return [VOCAB[c] for c in text]


def decode_ids(ids: Sequence[int]) -> str:
    """Inverse of :func:`encode_text` for answer tokens, cut at the first end token."""
    inv = {i: t for t, i in VOCAB.items()}
    out = []
    for i in ids:
        if i in END_IDS:
            break
        out.append(inv[i])
    return "".join(out)


def chat_prefix_ids(prompt: str) -> list[int]:
    """Token ids of the chat template rendered for one user turn, generation prompt added."""
    ids = [BOS_ID, VOCAB[START_HEADER]] + encode_text("user") + [VOCAB[END_HEADER]]
    ids += encode_text("\n\n" + prompt.strip()) + [EOT_ID, VOCAB[START_HEADER]]
    ids += encode_text("assistant") + [VOCAB[END_HEADER]] + encode_text("\n\n")
    return ids


def save_tokenizer(out: Path, max_len: int) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json.

    Why these choices: a WordLevel model over single characters with a per-character Split
    pre-tokenizer gives exactly one id per character; the ``Fuse`` decoder joins tokens without
    the spaces WordLevel's default decoding inserts; the post-processor prepends BOS, as
    LLaDA's tokenizer does, so vLLM's default ``add_special_tokens=True`` yields the
    ``[BOS] prompt`` layout the model was trained on.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BOS_ID)]
    )
    tok.add_special_tokens(SPECIALS + RESERVED)
    tok.save(str(out / "tokenizer.json"))

    added = {
        str(VOCAB[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIALS + RESERVED
    }
    config = {
        "added_tokens_decoder": added,
        "additional_special_tokens": [MASK, START_HEADER, END_HEADER, EOT],
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": UNK,
        "add_bos_token": True,
        "add_eos_token": False,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": max_len,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {
        "additional_special_tokens": [MASK, START_HEADER, END_HEADER, EOT],
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": UNK,
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Data: deterministic synthetic tasks.
# --------------------------------------------------------------------------------------------

ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
#: Seed of the held-out set that every evaluation of the shipped model uses.
EVAL_SEED = 12345


def _number(rng: random.Random, min_digits: int, max_digits: int) -> int:
    """A non-negative integer whose digit count is uniform in ``min_digits..max_digits``."""
    n = rng.randint(min_digits, max_digits)
    return rng.randint(0 if n == 1 else 10 ** (n - 1), 10**n - 1)


def _string(rng: random.Random, cfg: TrainConfig) -> str:
    return "".join(rng.choice(ALNUM) for _ in range(rng.randint(cfg.str_min, cfg.str_max)))


def task_add(rng: random.Random, cfg: TrainConfig) -> tuple[str, str]:
    """``123+989=`` -> ``1112``: carries make answer digits depend on each other."""
    a = _number(rng, cfg.add_min_digits, cfg.add_max_digits)
    b = _number(rng, cfg.add_min_digits, cfg.add_max_digits)
    width = cfg.add_max_digits + 1 if cfg.add_pad else 0
    return f"{a}+{b}=", f"{a + b:0{width}d}"


def task_reverse(rng: random.Random, cfg: TrainConfig) -> tuple[str, str]:
    """``rev(k3x9)=`` -> ``9x3k``: every answer token is a copy, all fillable in parallel."""
    s = _string(rng, cfg)
    return f"rev({s})=", s[::-1]


def task_sort(rng: random.Random, cfg: TrainConfig) -> tuple[str, str]:
    """``sort(k3x9)=`` -> ``39kx`` (character codes ascending): needs counting, not copying."""
    s = _string(rng, cfg)
    return f"sort({s})=", "".join(sorted(s))


TASKS: dict[str, Callable[[random.Random, TrainConfig], tuple[str, str]]] = {
    "add": task_add,
    "reverse": task_reverse,
    "sort": task_sort,
}


@dataclass(frozen=True)
class Example:
    """One problem: the raw prompt (what a user sends), its answer, and the task name."""

    task: str
    prompt: str
    answer: str


def sample_example(rng: random.Random, cfg: TrainConfig) -> Example:
    """Draw one problem from the task mix."""
    weights = cfg.weights
    names = [n for n in weights if weights[n] > 0]
    name = rng.choices(names, weights=[weights[n] for n in names])[0]
    prompt, answer = TASKS[name](rng, cfg)
    return Example(name, prompt, answer)


def heldout_set(n: int, seed: int, cfg: TrainConfig) -> list[Example]:
    """``n`` distinct held-out problems from their own seed (the training stream skips them)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[Example] = []
    while len(out) < n:
        ex = sample_example(rng, cfg)
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            out.append(ex)
    return out


def example_ids(
    ex: Example, gen_len: int, chat: bool = False, bos: bool = True
) -> tuple[list[int], list[int]]:
    """Prompt ids and the ``gen_len`` answer ids (answer, end token, EOS padding).

    Completion style is ``[BOS] prompt | answer EOS EOS ...`` (``bos=False`` drops the BOS);
    chat style wraps the prompt in the chat template and ends the answer with ``<|eot_id|>``
    before the EOS padding, as LLaDA-Instruct's SFT data does.
    """
    if chat:
        prompt = chat_prefix_ids(ex.prompt)
        answer = encode_text(ex.answer) + [EOT_ID]
    else:
        prompt = [BOS_ID] * bos + encode_text(ex.prompt)
        answer = encode_text(ex.answer) + [EOS_ID]
    if len(answer) > gen_len:
        raise ValueError(f"answer of {ex} does not fit gen_len={gen_len}")
    return prompt, answer + [EOS_ID] * (gen_len - len(answer))


# --------------------------------------------------------------------------------------------
# Model: LLaDA (OLMo-style "llama" block) with the released checkpoint's tensor names.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """Model size. Head dim is fixed at 64, a size vLLM's CPU attention kernels support."""

    d_model: int = 256
    n_heads: int = 4
    n_layers: int = 4
    mlp_hidden_size: int = 448
    vocab_size: int = VOCAB_SIZE
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 512

    @property
    def head_dim(self) -> int:
        """Every head is ``d_model / n_heads`` wide, as in LLaDA."""
        return self.d_model // self.n_heads


class RMSNorm(nn.Module):
    """LLaDA's RMSLayerNorm: normalise in fp32, then scale (no bias)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(n: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin of LLaDA's rotate-half RoPE for positions ``0..n-1`` (fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(n, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on ``(B, H, T, D)``."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Block(nn.Module):
    """LLaDALlamaBlock: pre-norm bidirectional attention + SwiGLU (``ff_proj`` is the gate)."""

    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.s = s
        d, f = s.d_model, s.mlp_hidden_size
        self.attn_norm = RMSNorm(d, s.rms_norm_eps)
        self.ff_norm = RMSNorm(d, s.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.ff_out = nn.Linear(f, d, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        b, t, d = x.shape
        h, hd = self.s.n_heads, self.s.head_dim
        xn = self.attn_norm(x)
        q = self.q_proj(xn).view(b, t, h, hd).transpose(1, 2)
        k = self.k_proj(xn).view(b, t, h, hd).transpose(1, 2)
        v = self.v_proj(xn).view(b, t, h, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=False)
        x = x + self.attn_out(att.transpose(1, 2).reshape(b, t, d))
        xn = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(xn)) * self.up_proj(xn))


class Transformer(nn.Module):
    """Holds ``wte``, ``blocks``, ``ln_f``, ``ff_out`` so names match ``model.transformer.*``."""

    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.wte = nn.Embedding(s.vocab_size, s.d_model)
        self.blocks = nn.ModuleList(Block(s) for _ in range(s.n_layers))
        self.ln_f = RMSNorm(s.d_model, s.rms_norm_eps)
        self.ff_out = nn.Linear(s.d_model, s.vocab_size, bias=False)


class LLaDA(nn.Module):
    """Dense, bidirectional LLaDA forward; ``state_dict`` keys are the released names."""

    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.s = s
        self.model = nn.Module()
        self.model.transformer = Transformer(s)
        cos, sin = rope_tables(s.max_sequence_length, s.head_dim, s.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """Normal(0.02); residual output projections scaled by 1/sqrt(2 * layers) (GPT-2)."""
        out_std = 0.02 / math.sqrt(2 * self.s.n_layers)
        residual_outs = ("attn_out.weight", "ff_out.weight")
        for name, p in self.named_parameters():
            if p.dim() == 1:
                continue
            residual_out = ".blocks." in name and name.endswith(residual_outs)
            nn.init.normal_(p, std=out_std if residual_out else 0.02)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, T, V)`` in fp32; ``lengths`` masks right padding out of the keys."""
        tr = self.model.transformer
        t = ids.shape[1]
        key_mask = None
        if lengths is not None:
            valid = torch.arange(t, device=ids.device)[None, :] < lengths[:, None]
            key_mask = valid[:, None, None, :]
        cos, sin = self.cos[:t], self.sin[:t]
        x = tr.wte(ids)
        for blk in tr.blocks:
            x = blk(x, cos, sin, key_mask)
        return tr.ff_out(tr.ln_f(x)).float()


# --------------------------------------------------------------------------------------------
# Checkpoint files in the released layout.
# --------------------------------------------------------------------------------------------


def config_dict(s: Shape) -> dict:
    """config.json, built by the shared tiny-checkpoint module so the LLaDA layout (every key
    of the released GSAI-ML/LLaDA-8B-Instruct config, in order) lives in one place."""
    return llada_config_dict(llada_shape(s))


def llada_shape(s: Shape) -> TinyCheckpoint:
    """Our sizes and character-tokenizer ids as the shared checkpoint description."""
    body = TransformerShape(
        hidden_size=s.d_model,
        num_heads=s.n_heads,
        num_kv_heads=s.n_heads,
        num_layers=s.n_layers,
        intermediate_size=s.mlp_hidden_size,
        vocab_size=s.vocab_size,
        rms_norm_eps=s.rms_norm_eps,
        rope_theta=s.rope_theta,
        max_position=s.max_sequence_length,
        qkv_bias=False,
    )
    return TinyCheckpoint(body, {token: VOCAB[token] for token in SPECIALS if token != UNK})


def save_checkpoint(model: LLaDA, out: Path) -> None:
    """Write config, generation config, bf16 safetensors and tokenizer files into ``out``.

    bf16 as the released LLaDA checkpoints: it halves the shipped file (5 MB instead of 10) and
    the training run's final evaluation scores these rounded weights, not the fp32 masters.
    """
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    s = model.s
    (out / "config.json").write_text(json.dumps(config_dict(s), indent=2) + "\n")
    gen = {
        "_from_model_config": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": EOS_ID,
        # A model trained on 16-token answers needs blocks that divide them (the plugin's default
        # block of 32 does not fit it); vllm-dllm reads `dllm_*` keys here the way vLLM reads
        # sampling defaults from this file.
        **TRAINED_DEFAULTS,
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tensors = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    save_tokenizer(out, s.max_sequence_length)


def load_checkpoint(path: Path) -> LLaDA:
    """Rebuild the model from a saved directory (config.json + model.safetensors)."""
    from safetensors.torch import load_file

    cfg = json.loads((path / "config.json").read_text())
    s = Shape(
        d_model=cfg["d_model"],
        n_heads=cfg["n_heads"],
        n_layers=cfg["n_layers"],
        mlp_hidden_size=cfg["mlp_hidden_size"],
        vocab_size=cfg["embedding_size"] or cfg["vocab_size"],
        rope_theta=cfg["rope_theta"],
        rms_norm_eps=cfg["rms_norm_eps"],
        max_sequence_length=cfg["max_sequence_length"],
    )
    model = LLaDA(s)
    model.load_state_dict(load_file(str(path / "model.safetensors")))  # upcast to fp32
    return model.eval()


# --------------------------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of the shipped run (the defaults are what shipped)."""

    seed: int = 0
    steps: int = 5000
    batch_size: int = 64
    lr: float = 5e-4
    min_lr_frac: float = 0.05
    warmup: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eps: float = 1e-3
    objective: str = "k"
    gen_len: int = 16
    chat_every: int = 16
    no_bos_frac: float = 0.1
    w_add: float = 0.44
    w_reverse: float = 0.25
    w_sort: float = 0.31
    add_min_digits: int = 3
    add_max_digits: int = 3
    add_pad: int = 0
    str_min: int = 3
    str_max: int = 6

    @property
    def weights(self) -> dict[str, float]:
        """Task mix of the training stream (and of the held-out set)."""
        return {
            "add": self.w_add,
            "reverse": self.w_reverse,
            "sort": self.w_sort,
        }


def make_batch(
    rng: random.Random, cfg: TrainConfig, exclude: set[str], chat: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, lengths and the answer-region mask of one right-padded training batch.

    Chat-formatted examples come in batches of their own: their ~30-token template would
    otherwise set the padded length of nearly every batch. A few completion prompts lack the
    BOS that the tokenizer adds, so a client that tokenizes without special tokens still works.
    """
    rows: list[tuple[list[int], list[int]]] = []
    while len(rows) < cfg.batch_size:
        ex = sample_example(rng, cfg)
        if ex.prompt in exclude:
            continue
        bos = chat or rng.random() >= cfg.no_bos_frac
        rows.append(example_ids(ex, cfg.gen_len, chat=chat, bos=bos))
    lengths = [len(p) + len(a) for p, a in rows]
    t = max(lengths)
    ids = torch.full((len(rows), t), EOS_ID, dtype=torch.long)
    answer = torch.zeros((len(rows), t), dtype=torch.bool)
    for i, (p, a) in enumerate(rows):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        answer[i, len(p) : len(p) + len(a)] = True
    return ids, torch.tensor(lengths), answer


def diffusion_loss(
    model: LLaDA, ids: torch.Tensor, lengths: torch.Tensor, answer: torch.Tensor, cfg: TrainConfig
) -> torch.Tensor:
    """LLaDA's masked-diffusion loss on the answer region (module docstring: the two forms).

    The mask level ``u`` is stratified over the batch (``(i + U(0,1)) / B``, shuffled): still
    uniform per example, with less gradient variance than independent draws. Every answer
    region is exactly ``gen_len`` long (``example_ids`` pads it), so ``k / gen_len`` is ``t``.
    """
    b = ids.shape[0]
    dev = ids.device
    u = (torch.randperm(b, device=dev) + torch.rand(b, device=dev)) / b
    if cfg.objective == "k":
        g = cfg.gen_len
        k = (u * g).long().clamp(max=g - 1) + 1
        rank = torch.rand(ids.shape, device=dev).masked_fill(~answer, 2.0).argsort(1).argsort(1)
        masked = (rank < k[:, None]) & answer
        t = k.float() / g
    else:
        t = (1 - cfg.eps) * u + cfg.eps
        masked = (torch.rand(ids.shape, device=dev) < t[:, None]) & answer
    noisy = torch.where(masked, torch.full_like(ids, MASK_ID), ids)
    logits = model(noisy, lengths)
    ce = F.cross_entropy(logits[masked], ids[masked], reduction="none")
    weight = (1.0 / t)[:, None].expand_as(ids)[masked]
    return (ce * weight).sum() / (b * cfg.gen_len)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_frac * lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def train(
    model: LLaDA,
    cfg: TrainConfig,
    heldout: list[Example],
    log_every: int = 50,
    eval_every: int = 0,
) -> float:
    """Train in place; returns the wall time in seconds."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
        fused=True,
    )
    dev = next(model.parameters()).device
    exclude = {ex.prompt for ex in heldout}
    rng = random.Random(cfg.seed)
    start = time.perf_counter()
    running = 0.0
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        chat = cfg.chat_every > 0 and step % cfg.chat_every == cfg.chat_every - 1
        ids, lengths, answer = (t.to(dev) for t in make_batch(rng, cfg, exclude, chat))
        loss = diffusion_loss(model, ids, lengths, answer, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        running += loss.item()
        if (step + 1) % log_every == 0:
            el = time.perf_counter() - start
            print(
                f"step {step + 1:6d}  loss {running / log_every:.4f}  "
                f"lr {lr_at(step, cfg):.2e}  {el:7.1f}s",
                flush=True,
            )
            running = 0.0
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < cfg.steps:
            model.eval()
            res = evaluate(model, heldout[:200], cfg.gen_len, cfg.gen_len, None)
            tasks = " ".join(f"{k}={v:.2f}" for k, v in res["per_task"].items())
            print(f"  eval@{step + 1}: one-per-step acc {res['acc']:.3f} [{tasks}]", flush=True)
            model.train()
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# Evaluation: the section 2 loop in plain torch (cache "none", temperature 0).
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def diffusion_generate(
    model: LLaDA,
    prompts: list[list[int]],
    gen_len: int,
    block_len: int,
    threshold: float | None = None,
    per_step: int = 1,
) -> tuple[list[list[int]], list[int], list[int]]:
    """Decode a batch of prompts; returns (answer ids, forwards, committed tokens) per prompt.

    Each prompt's canvas is its own (right padding is masked out of the keys), so results do
    not depend on the batch. Rule: ``threshold`` commits every masked position of the current
    block with confidence >= threshold (always the most confident one); without a threshold,
    the ``per_step`` most confident positions are committed. Early stop as in docs/design.md.
    """
    n = len(prompts)
    dev = next(model.parameters()).device
    plen = [len(p) for p in prompts]
    lengths = torch.tensor([p + gen_len for p in plen], device=dev)
    x = torch.full((n, int(lengths.max())), EOS_ID, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        x[i, : len(p)] = torch.tensor(p)
        x[i, len(p) : len(p) + gen_len] = MASK_ID
    forwards = [0] * n
    committed = [0] * n
    active = list(range(n))
    nblocks = gen_len // block_len
    block = [0] * n
    while active:
        # Advance finished blocks; drop finished requests (all blocks done or early stop).
        still = []
        for i in active:
            while block[i] < nblocks:
                s = plen[i] + block[i] * block_len
                if (x[i, s : s + block_len] == MASK_ID).any():
                    break
                block[i] += 1
            if block[i] < nblocks and not _early_stop(x[i], plen[i], gen_len):
                still.append(i)
        active = still
        if not active:
            break
        idx = torch.tensor(active, device=dev)
        logits = model(x[idx], lengths[idx])
        logits[..., MASK_ID] = -float("inf")
        probs = torch.softmax(logits, dim=-1)
        conf, x0 = probs.max(dim=-1)
        for row, i in enumerate(active):
            forwards[i] += 1
            s = plen[i] + block[i] * block_len
            e = s + block_len
            cand = (x[i, s:e] == MASK_ID).nonzero().flatten() + s
            c = conf[row, cand]
            order = torch.argsort(c, descending=True, stable=True)
            if threshold is not None:
                take = cand[c >= threshold]
                if take.numel() == 0:
                    take = cand[order[:1]]
            else:
                take = cand[order[:per_step]]
            x[i, take] = x0[row, take]
            committed[i] += int(take.numel())
    answers = [x[i, plen[i] : plen[i] + gen_len].tolist() for i in range(n)]
    return answers, forwards, committed


def _early_stop(row: torch.Tensor, p: int, gen_len: int) -> bool:
    """True once an end token is committed at q and every position in [p, q) is committed."""
    gen = row[p : p + gen_len]
    for tok in gen.tolist():
        if tok == MASK_ID:
            return False
        if tok in END_IDS:
            return True
    return False


def evaluate(
    model: LLaDA,
    problems: list[Example],
    gen_len: int,
    block_len: int,
    threshold: float | None,
    per_step: int = 1,
    chat: bool = False,
    bos: bool = True,
    batch: int = 100,
) -> dict:
    """Exact-match accuracy and tokens per forward over ``problems`` (plus per-task accuracy).

    ``tpf_output`` counts the answer's tokens plus its end token per forward (what a user
    receives); ``tpf_committed`` counts every committed position, EOS padding included.
    """
    correct: dict[str, list[int]] = {}
    fw = com = out_tok = 0
    for b0 in range(0, len(problems), batch):
        chunk = problems[b0 : b0 + batch]
        prompts = [example_ids(ex, gen_len, chat, bos)[0] for ex in chunk]
        answers, forwards, committed = diffusion_generate(
            model, prompts, gen_len, block_len, threshold, per_step
        )
        for ex, a, f, c in zip(chunk, answers, forwards, committed, strict=True):
            text = decode_ids(a)
            correct.setdefault(ex.task, []).append(int(text == ex.answer))
            fw += f
            com += c
            out_tok += min(len(text) + 1, gen_len)
    allc = [v for vs in correct.values() for v in vs]
    return {
        "acc": sum(allc) / len(allc),
        "per_task": {k: sum(v) / len(v) for k, v in sorted(correct.items())},
        "forwards_per_problem": fw / len(allc),
        "tpf_output": out_tok / fw,
        "tpf_committed": com / fw,
    }


def eval_table(
    model: LLaDA, heldout: list[Example], gen_len: int, quick: bool = False
) -> dict[str, dict]:
    """The rules the model card reports, block length = gen_len and 8, plus chat format once."""
    rules: list[tuple[str, float | None, int]] = [
        ("one-per-step", None, 1),
        ("threshold-0.9", 0.9, 1),
        ("threshold-0.7", 0.7, 1),
        ("threshold-0.5", 0.5, 1),
        ("two-per-step", None, 2),
    ]
    table: dict[str, dict] = {}
    if quick:
        rules = rules[:2]
    for block_len in (gen_len,) if quick else (gen_len, 8):
        for name, thr, k in rules:
            key = f"B={block_len} {name}"
            table[key] = evaluate(model, heldout, gen_len, block_len, thr, k)
            _print_row(key, table[key])
    key = f"chat B={gen_len} threshold-0.9"
    table[key] = evaluate(model, heldout, gen_len, gen_len, 0.9, chat=True)
    _print_row(key, table[key])
    if not quick:
        key = f"no-BOS B={gen_len} threshold-0.9"
        table[key] = evaluate(model, heldout, gen_len, gen_len, 0.9, bos=False)
        _print_row(key, table[key])
    return table


def _print_row(key: str, r: dict) -> None:
    tasks = " ".join(f"{k}={v:.3f}" for k, v in r["per_task"].items())
    print(
        f"{key:28s} acc {r['acc']:.3f}  tpf(out) {r['tpf_output']:.2f}  "
        f"tpf(all) {r['tpf_committed']:.2f}  fw/prob {r['forwards_per_problem']:.2f}  [{tasks}]",
        flush=True,
    )


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Train (or only evaluate) and write the checkpoint directory."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "models" / "llada-arith")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--eval-n", type=int, default=400, help="held-out problems")
    p.add_argument("--eval-seed", type=int, default=EVAL_SEED)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cuda only to iterate; ship the CPU run")
    p.add_argument("--metrics-json", type=Path, default=None)
    p.add_argument("--final-eval", choices=["full", "quick", "none"], default="full")
    for f, v in asdict(TrainConfig()).items():
        p.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=v)
    for f, v in asdict(Shape()).items():
        if f != "vocab_size":
            p.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=v)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(**{f: getattr(args, f) for f in asdict(TrainConfig())})
    shape = Shape(**{f: getattr(args, f) for f in asdict(Shape()) if f != "vocab_size"})
    heldout = heldout_set(args.eval_n, args.eval_seed, cfg)

    if args.eval_only:
        model = load_checkpoint(args.out).to(args.device)
        wall = None
    else:
        torch.manual_seed(cfg.seed)
        model = LLaDA(shape).to(args.device)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"shape {shape}  params {n_params:,} ({n_params * 4 / 1e6:.2f} MB fp32)")
        print(f"train {cfg}", flush=True)
        model.train()
        wall = train(model, cfg, heldout, eval_every=args.eval_every)
        print(f"training wall time {wall:.1f}s ({wall / 60:.1f} min)", flush=True)
        save_checkpoint(model.cpu(), args.out)
        model = load_checkpoint(args.out).to(args.device)
        print(f"saved {args.out}", flush=True)

    if args.final_eval == "none":
        return
    table = eval_table(model, heldout, cfg.gen_len, quick=args.final_eval == "quick")
    if args.metrics_json is not None:
        args.metrics_json.write_text(
            json.dumps({"train_wall_s": wall, "train": asdict(cfg), "eval": table}, indent=2)
        )


if __name__ == "__main__":
    main()
