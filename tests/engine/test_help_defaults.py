"""``--help`` describes every option of ``keel plan`` and ``keel reshard-plan`` with its default, and the
``rm.bt_variant`` field reads as a sentence: a trial user found bare ``--train-tensor TRAIN_TENSOR`` lines,
``--recompute`` without its default, and "scaled when every pair carries a strength 'margin', else regular"."""

from __future__ import annotations

import re

import pytest

from engine.cli import build_parser


def _options(capsys: pytest.CaptureFixture[str], command: str) -> dict[str, str]:
    """Each long option of ``keel <command> --help`` → its help text (one line, spaces collapsed)."""
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split()).split(" options: ", 1)[1]
    found = re.findall(r"(--[a-z-]+)(?: \{[a-z0-9,-]+\}| [A-Z_]+)?(?:, --[a-z-]+ [A-Z_]+)? (.*?)(?= --[a-z]|$)", text)
    return dict(found)


@pytest.mark.parametrize("command, options", [
    ("reshard-plan", {"--train-tensor": "1", "--train-pipeline": "1", "--data": "1", "--generation-tensor": "1",
                      "--bucket-mib": "64", "--transport": "collective", "--limit": "40"}),
    ("plan", {"--recompute": "none", "--dtype": "bf16", "--micro-batch": "1", "--generation-batch": "64",
              "--gpus-per-node": "8"}),
])
def test_every_option_says_what_it_is_and_its_default(command: str, options: dict[str, str],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    described = _options(capsys, command)
    for option, default in options.items():
        text = described.get(option, "")
        assert text.endswith(f"(default: {default})") and len(text) > 20, (option, text)


def test_the_bt_variant_help_names_each_loss() -> None:
    from dataclasses import fields

    from engine.algorithms.reward import RewardConfig

    text = next(f.metadata["doc"] for f in fields(RewardConfig) if f.name == "bt_variant")
    assert "carries a strength 'margin', else" not in text, text
    for variant, loss in [("regular", "-log sigmoid(r_c - r_r)"), ("margin", "-log sigmoid(r_c - r_r - |l|)"),
                          ("scaled", "|l| * -log sigmoid(r_c - r_r)")]:
        assert f"'{variant}' {loss}" in text, text
    assert "'auto' picks scaled if every pair has a margin, else regular" in text, text
