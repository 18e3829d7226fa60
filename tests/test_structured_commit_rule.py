"""The commit rule under a grammar (`vllm_dllm.structured.commit_rule`), with xgrammar itself.

A tiny raw vocabulary compiled by xgrammar stands in for a tokenizer; random logits stand in
for a model. Every step of the simulated denoising loop must leave a committed prefix that a
fresh matcher accepts token by token, and the loop must end with a sentence of the language.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import xgrammar as xgr

from vllm_dllm.sampling import SelectionRule, select
from vllm_dllm.structured.commit_rule import (
    accepted_run,
    apply_token_bitmask_,
    clear_from_frontier,
    constrain_selection,
    raise_frontier,
)

VOCAB = ["<eos>", "<mask>", *"0123456789", "12", "99", "+", "=", "{", "}", '"', ":", ",", " ",
         *"abcdefghijklmnopqrstuvwxyz", "true", "false", '{"', '":', '"}']  # fmt: skip
EOS, MASK = 0, 1


@pytest.fixture(scope="module")
def compiler() -> xgr.GrammarCompiler:
    info = xgr.TokenizerInfo(VOCAB, xgr.VocabType.RAW, vocab_size=len(VOCAB), stop_token_ids=[EOS])
    return xgr.GrammarCompiler(info, cache_enabled=False)


def _bitmask(matcher: xgr.GrammarMatcher) -> torch.Tensor:
    bitmask = xgr.allocate_token_bitmask(1, len(VOCAB))
    matcher.fill_next_token_bitmask(bitmask, 0)
    return bitmask


def test_bitmask_forbids_exactly_the_grammars_rejections(compiler: xgr.GrammarCompiler) -> None:
    matcher = xgr.GrammarMatcher(compiler.compile_regex("[0-9]{1,4}"))
    scores = torch.zeros(3, len(VOCAB))
    apply_token_bitmask_(scores, torch.tensor([1]), _bitmask(matcher))
    allowed = {VOCAB[t] for t in torch.nonzero(scores[1].isfinite()).flatten().tolist()}
    assert allowed == set("0123456789") | {"12", "99"}
    assert scores[0].isfinite().all() and scores[2].isfinite().all()  # other rows untouched
    matcher.accept_token(VOCAB.index("12"))
    scores = torch.zeros(1, len(VOCAB))
    apply_token_bitmask_(scores, torch.tensor([0]), _bitmask(matcher))
    assert scores[0, EOS].isfinite()  # "12" may end here


def test_selection_is_cut_to_the_run_from_the_frontier() -> None:
    chosen = torch.tensor([[False, False, True, True, False, True],
                           [False, True, False, True, True, False],
                           [True, False, True, False, False, False]])  # fmt: skip
    frontier = torch.tensor([1, 1, -1])
    out = constrain_selection(chosen, frontier)
    # Row 0: the frontier (column 1) is forced in, then 2, 3; column 5 is past the gap.
    assert out[0].tolist() == [False, True, True, True, False, False]
    assert out[1].tolist() == [False, True, False, False, False, False]
    assert out[2].tolist() == chosen[2].tolist()  # unconstrained row unchanged


def test_raised_frontier_is_what_every_rule_picks_first() -> None:
    confidence = torch.tensor([[0.0, 0.2, 0.99, 0.95], [0.0, -0.9, -0.01, -0.02]])
    candidates = torch.tensor([[False, True, True, True]] * 2)
    frontier = torch.tensor([[False, True, False, False]] * 2)
    rules = torch.tensor([SelectionRule.STEPS, SelectionRule.ENTROPY_BOUNDED])
    raised = raise_frontier(confidence, frontier, rules == SelectionRule.ENTROPY_BOUNDED)
    chosen = select(raised, candidates, rules, torch.tensor([0.9, 0.9]), torch.ones(2),
                    torch.tensor([1, 1]), torch.tensor([0.015, 0.015]))  # fmt: skip
    # Quota 1: the frontier instead of the most confident column; entropy: the frontier's 0
    # plus the lowest entropy (0.01) fit the bound, 0.02 more does not.
    assert chosen[0].tolist() == [False, True, False, False]
    assert chosen[1].tolist() == [False, True, True, False]


def test_clearing_puts_mask_back_from_the_frontier() -> None:
    tokens = torch.arange(20, dtype=torch.int32)
    index = torch.tensor([[0, 1, 2, 3], [10, 11, 12, 19]])
    clear_from_frontier(tokens, index, torch.tensor([2, -1]), torch.tensor([4, 3]), MASK)
    assert tokens[:4].tolist() == [0, 1, MASK, MASK]
    assert tokens[10:13].tolist() == [10, 11, 12]


def test_accepted_run_stops_at_the_first_rejection(compiler: xgr.GrammarCompiler) -> None:
    matcher = xgr.GrammarMatcher(compiler.compile_regex("[0-9]{1,3}"))
    digits = [VOCAB.index(c) for c in "1234"]
    committed = np.array([7, 7, *digits, -1])
    assert accepted_run(matcher, committed, 2) == 3  # the fourth digit is one too many
    assert matcher.accept_token(EOS) and matcher.is_terminated()
    assert accepted_run(matcher, np.array([EOS]), 0) == 0  # nothing after the end


def _decode(compiler: xgr.GrammarCompiler, grammar: xgr.CompiledGrammar, length: int,
            seed: int, rule: SelectionRule) -> tuple[str, int, bool]:  # fmt: skip
    """A denoising loop on random logits under the rule; returns the text, the forward count
    and whether the grammar ended (rather than the canvas), checking after every step that the
    committed prefix is a valid prefix of the language."""
    generator = torch.Generator().manual_seed(seed)
    matcher = xgr.GrammarMatcher(grammar)
    canvas = torch.full((length,), MASK, dtype=torch.int32)
    frontier, forwards = 0, 0
    while frontier < length and not matcher.is_terminated():
        forwards += 1
        scores = torch.randn(length, len(VOCAB), generator=generator) * 4
        scores[:, MASK] = float("-inf")
        apply_token_bitmask_(scores, torch.tensor([frontier]), _bitmask(matcher))
        x0 = scores.argmax(-1)
        confidence = scores.softmax(-1).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
        masked = canvas.eq(MASK).unsqueeze(0)
        is_frontier = torch.arange(length).eq(frontier).unsqueeze(0)
        rules = torch.tensor([rule])
        by_entropy = rules == SelectionRule.ENTROPY_BOUNDED
        raised = raise_frontier(confidence.unsqueeze(0), is_frontier, by_entropy)
        chosen = select(raised, masked, rules, torch.tensor([0.3]), torch.ones(1),
                        torch.tensor([2]), torch.tensor([1.0]))  # fmt: skip
        chosen = constrain_selection(chosen, torch.tensor([frontier]))[0]
        canvas = torch.where(chosen, x0.to(torch.int32), canvas)
        committed = torch.where(chosen, x0, -1).numpy()
        accepted = accepted_run(matcher, committed, frontier)
        assert accepted >= 1  # the bitmasked frontier is always accepted
        frontier += accepted
        clear_from_frontier(canvas, torch.arange(length).unsqueeze(0), torch.tensor([frontier]),
                            torch.tensor([length]), MASK)  # fmt: skip
        check = xgr.GrammarMatcher(grammar)
        assert all(check.accept_token(int(t)) for t in canvas[:frontier])
        assert canvas[frontier:].eq(MASK).all()
    text = "".join(VOCAB[t] for t in canvas[:frontier].tolist() if t != EOS)
    return text, forwards, matcher.is_terminated()


@pytest.mark.parametrize("rule", [SelectionRule.THRESHOLD, SelectionRule.STEPS,
                                  SelectionRule.FACTOR])  # fmt: skip
def test_random_models_only_ever_commit_the_language(compiler: xgr.GrammarCompiler,
                                                     rule: SelectionRule) -> None:  # fmt: skip
    regex = compiler.compile_regex("[0-9]{1,4}")
    schema = compiler.compile_json_schema(json.dumps({
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "yz"]}},
        "required": ["a", "b"], "additionalProperties": False,
    }), any_whitespace=False)  # fmt: skip
    choice = compiler.compile_grammar('root ::= "true" | "false" | "abc"')
    parallel = ended = 0
    for seed in range(20):
        text, forwards, _ = _decode(compiler, regex, 8, seed, rule)
        assert re.fullmatch("[0-9]{1,4}", text), text
        parallel += forwards < len(text)
        text, _, _ = _decode(compiler, choice, 8, seed, rule)
        assert text in ("true", "false", "abc"), text
        # A random model may write digits until the canvas ends: then the prefix is valid
        # (checked every step) but unfinished, as a length-limited answer is in vLLM.
        text, _, terminated = _decode(compiler, schema, 40, seed, rule)
        if terminated:
            value = json.loads(text)
            assert isinstance(value["a"], int) and value["b"] in ("x", "yz"), text
            ended += 1
    assert parallel > 0  # some runs committed several tokens in one step
    assert ended >= 5
