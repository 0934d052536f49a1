"""``keel generate`` on the native backend: TP1 and TP2 (2 replicas vs one TP2 replica) agree, bad input
is refused before the model loads, and an interrupted run resumes from its partial output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import keel_train, launch

SFT = ["model.preset=tiny-llama", "run.train_steps=2", "data.num_samples=64", "data.seq_length=96",
       "data.micro_batch_size=2", "data.global_batch_size=4", "logging.progress=false",
       "logging.tensorboard=false", "checkpoint.resume=none"]
PROMPTS = ["Spell cat backwards.", "What is 3 plus 4?", "Count the letters in river.", "Say hi."]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("policy")
    keel_train(1, [*SFT, f"run.output_dir={out}"])
    (out / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return out


def _generate(nproc: int, checkpoint: Path, output: Path, *extra: str, check: bool = True):  # type: ignore[no-untyped-def]
    return launch(nproc, ["-m", "engine", "generate", str(checkpoint / "checkpoints"), str(checkpoint / "prompts.jsonl"),
                          str(output), "--max-new-tokens", "12", "--quiet", *extra], check=check)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_tp1_tp2_and_resume(checkpoint: Path, tmp_path: Path) -> None:
    one, two, sampled = tmp_path / "one.jsonl", tmp_path / "two.jsonl", tmp_path / "sampled.jsonl"
    _generate(1, checkpoint, one, "--batch-size", "3")
    _generate(2, checkpoint, two, "--tensor", "2")
    first, second = _rows(one), _rows(two)
    assert [r["prompt"] for r in first] == PROMPTS
    assert [r["completion"] for r in first] == [r["completion"] for r in second]
    assert all(r["finish_reason"] in ("stop", "length") and 0 < r["tokens"] <= 12 for r in first)
    # two replicas of TP1 share the prompts; rows draw from their own seeds, so sampling agrees with one process
    _generate(2, checkpoint, sampled, "--temperature", "1.0", "--top-p", "0.9", "--seed", "5")
    alone = tmp_path / "alone.jsonl"
    _generate(1, checkpoint, alone, "--temperature", "1.0", "--top-p", "0.9", "--seed", "5")
    assert _rows(sampled) == _rows(alone)

    resumed = tmp_path / "resumed.jsonl"
    marker = dict(first[0], completion="FROM THE INTERRUPTED RUN")
    Path(f"{resumed}.partial").write_text(json.dumps(marker) + "\n" + '{"prompt": "torn')
    _generate(1, checkpoint, resumed)
    rows = _rows(resumed)
    assert rows[0]["completion"] == "FROM THE INTERRUPTED RUN"
    assert [r["completion"] for r in rows[1:]] == [r["completion"] for r in first[1:]]
    assert not Path(f"{resumed}.partial").exists()


def test_generate_refuses_bad_input_before_loading(checkpoint: Path, tmp_path: Path) -> None:
    long_prompts = tmp_path / "long.jsonl"
    long_prompts.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": "word " * 200}) + "\n")
    proc = launch(1, ["-m", "engine", "generate", str(checkpoint / "checkpoints"), str(long_prompts),
                      str(tmp_path / "x.jsonl")], check=False)
    assert proc.returncode != 0
    assert "long.jsonl, line 2: field 'prompt'" in proc.stderr and "no room to generate" in proc.stderr, proc.stderr[-800:]

    proc = _generate(1, checkpoint, tmp_path / "y.jsonl", "--top-p", "1.5", check=False)
    assert proc.returncode != 0 and "top_p=1.5 must be in (0, 1]" in proc.stderr, proc.stderr[-800:]

    proc = _generate(1, checkpoint, tmp_path / "y.jsonl", "--beam-width", "4", check=False)
    assert proc.returncode != 0 and "unrecognized arguments: --beam-width" in proc.stderr, proc.stderr[-800:]

    # tiny-llama has 2 KV heads: a generation TP of 4 cannot split them (refused before any process group)
    proc = _generate(1, checkpoint, tmp_path / "y.jsonl", "--tensor", "4", check=False)
    assert proc.returncode != 0, proc.stderr[-800:]
    assert "generation tensor-parallel size 4 does not divide the world size 1" in proc.stderr, proc.stderr[-800:]
    assert not (tmp_path / "y.jsonl").exists()
