"""A byte-level tokenizer with the released special tokens at the ids a checkpoint needs.

``AutoTokenizer.from_pretrained`` loads it offline: 256 byte tokens (no merges), the special
tokens at their ids, every other id a plain ``<|reserved_token_N|>`` so that any logit row
decodes to text.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from vllm_dllm.testing.files import write_json


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def write_tokenizer(
    out: Path,
    vocab_size: int,
    token_ids: Mapping[str, int],
    tokenizer_config: dict[str, Any],
    *,
    special_map: dict[str, Any],
) -> None:
    """Byte-level tokenizer whose ids match the config: bytes 0-255, specials at their ids."""
    special_tokens = {token_id: text for text, token_id in token_ids.items()}
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    for token_id in range(256, vocab_size):
        vocab[special_tokens.get(token_id, f"<|reserved_token_{token_id}|>")] = token_id
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Tokens already in the vocabulary keep their ids when added as special tokens.
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for _, t in sorted(special_tokens.items())])
    tok.save(str(out / "tokenizer.json"))

    added = {
        str(token_id): {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True}
        for token_id, text in sorted(special_tokens.items())
    }
    write_json(out / "tokenizer_config.json", {
        "added_tokens_decoder": added,
        **tokenizer_config,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    token_entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    write_json(out / "special_tokens_map.json", {
        key: value if isinstance(value, list) else {"content": value, **token_entry}
        for key, value in special_map.items()
    })
