"""Pair and attribute samples: layout, pairs kept together, over-long policy."""

from __future__ import annotations

import torch

from engine.data.chat import render_prompt, render_reply
from engine.data.preference import AttributeDataset, PreferenceDataset
from engine.data.schemas import MISSING
from engine.data.tokenizers import ByteTokenizer

TOK = ByteTokenizer()
PAIRS = [
    {"prompt": "What is 1 + 1?", "chosen": "2.", "rejected": "Three.", "margin": 2.0, "annotator_strengths": [2, 1]},
    {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "Go away.",
     "annotator_strengths": [1, -1, 2]},
    {"prompt": "Hey", "chosen": "Hi.", "rejected": "Yo."},
]


def test_pairs_stay_together_in_a_micro_batch() -> None:
    data = PreferenceDataset(PAIRS, TOK, 48)
    batch = data.collate([2, 0, 1])
    assert batch["tokens"].shape == (6, 48) and batch["margin"].tolist() == [0.0, 2.0, 0.0]
    assert batch["diverging"].tolist() == [False, False, True] and batch["annotator_spread"].tolist() == [0, 1, 3]
    for row, (pair, half) in enumerate((p, h) for p in (2, 0, 1) for h in ("chosen", "rejected")):
        prompt = render_prompt([{"role": "user", "content": "Hi"}] if pair == 1 else
                               [{"role": "user", "content": PAIRS[pair]["prompt"]}], TOK)
        reply = render_reply(PAIRS[pair][half], TOK)
        ids = prompt + reply
        end = int(batch["end_index"][row])
        assert end == len(ids) - 1 and batch["tokens"][row, : end + 1].tolist() == ids
        assert batch["tokens"][row, end].item() == TOK.eos_id  # the reward head reads the end-of-response token
        # loss marks exactly the reply tokens, as next-token labels
        picked = batch["labels"][row][batch["loss_mask"][row].bool()].tolist()
        assert picked == reply


def test_over_long_pairs_keep_the_response_and_cut_the_prompt_from_the_left() -> None:
    long_prompt = {"prompt": "p" * 40 + "END", "chosen": "a", "rejected": "bbb"}
    long_reply = {"prompt": "q", "chosen": "a" * 60, "rejected": "b"}
    data = PreferenceDataset([long_prompt, long_reply], TOK, 32, source="pairs.jsonl")
    # the pair whose response alone does not fit is dropped and counted; the other keeps both responses whole
    assert len(data) == 1
    counts = data.overlong_counts
    assert (counts.source, counts.total, counts.prompt_cut, counts.dropped) == ("pairs.jsonl", 2, 1, 1)
    batch = data.collate([0])
    for row, reply in ((0, "a"), (1, "bbb")):
        end = int(batch["end_index"][row])
        ids = batch["tokens"][row, : end + 1].tolist()
        assert ids[-1] == TOK.eos_id and TOK.decode(ids[-len(reply) - 1: -1]) == reply
        # the template's structure stays: BOS, the user header, the end of the prompt, the assistant header
        assert ids[0] == TOK.bos_id
        text = TOK.decode(ids[1: -len(reply) - 1])
        assert text.startswith("User: p") and text.endswith("pppEND\nAssistant: ")
        assert "p" * 40 not in text
    # both responses of a pair read the same (cut) prompt, cut to fit the longer one
    rejected_end = int(batch["end_index"][1])
    assert batch["tokens"][0, : int(batch["end_index"][0]) - 1].tolist() == batch["tokens"][1, : rejected_end - 3].tolist()
    assert rejected_end == 31  # the longer response fills the sequence exactly
    assert len(PreferenceDataset([long_prompt], TOK, 32, overlong="drop")) == 0


def test_cut_drops_oldest_turns_first_and_keeps_as_much_as_fits() -> None:
    from engine.data.fit import fit_prompt

    messages = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "first question " * 3},
                {"role": "assistant", "content": "first answer " * 3}, {"role": "user", "content": "last?"}]
    reply = render_reply("Yes.", TOK)
    whole = render_prompt(messages, TOK)
    assert fit_prompt(messages, len(reply), TOK, "plain", len(whole) + len(reply)) == (whole, False)
    starts = {len(whole) + len(reply) - 1: "System: e nice.\nUser: first", 100: "User: rst question \nAssistant: first",
              60: "User: \nAssistant: irst answer User: last?"}
    for limit, start in starts.items():
        fitted = fit_prompt(messages, len(reply), TOK, "plain", limit)
        assert fitted is not None and fitted[1]
        text = TOK.decode(fitted[0])
        assert len(fitted[0]) + len(reply) == limit  # byte tokens: the longest cut that fits
        assert text.startswith(start) and text.endswith("User: last?\nAssistant: ")
    only_last = TOK.decode(fit_prompt(messages, len(reply), TOK, "plain", 28)[0])  # type: ignore[index]
    assert only_last == "User: ast?\nAssistant: "  # the last user turn is cut from its left, headers kept
    assert fit_prompt(messages, len(reply), TOK, "plain", 20) is None  # headers + reply alone do not fit


def test_attribute_samples_keep_the_missing_sentinel() -> None:
    rows = [{"prompt": "Hi", "response": "Hello.", "helpfulness": 3, "correctness": MISSING, "coherence": 4,
             "complexity": 1, "verbosity": 0}]
    batch = AttributeDataset(rows, TOK, 128, template="llama3").collate([0, 0])
    assert batch["attributes"].tolist() == [[3.0, -100.0, 4.0, 1.0, 0.0]] * 2
    assert torch.equal(batch["tokens"][0, batch["end_index"][0]], torch.tensor(TOK.eos_id))
