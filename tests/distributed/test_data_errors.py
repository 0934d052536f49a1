"""A user's own pairs file under torchrun: a data error is one line on every rank, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import keel_train


def test_strength_variant_on_pairs_without_strengths_exits_with_one_line_per_rank(tmp_path: Path) -> None:
    rows = [{"prompt": f"question {i}", "chosen": f"answer {i}", "rejected": "no", **({"margin": 1} if i == 0 else {})}
            for i in range(16)]
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    # only data.source is set, as a user would: validation is held out from it, not taken from a default
    proc = keel_train(2, ["rm.type=bt", "rm.bt_variant=scaled", f"data.source={source}", "data.format=pairs",
                          "data.seq_length=64", "data.micro_batch_size=2", "data.global_batch_size=4",
                          f"run.output_dir={tmp_path / 'run'}", "logging.progress=false"], algo="rm", check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("keel: data error:")]
    assert len(errors) == 2, proc.stderr[-3000:]  # one per rank
    assert all(f"{source}, line 2: field 'margin'" in line and "rm.bt_variant=scaled" in line for line in errors)
    assert "builtin:helpsteer" not in proc.stderr
    assert "engine/cli.py" not in proc.stderr and "engine/trainer.py" not in proc.stderr  # no rank traceback
