"""DPO pairs, and the file of precomputed reference log-probs that can replace the reference model.

:class:`DPOPairs` is a :class:`~engine.data.preference.PreferenceDataset` (rows
``[c0, r0, c1, r1, ...]``, reply tokens in ``loss_mask``) built from ``pairs`` rows, from
HelpSteer attribute rows paired by helpfulness (ties dropped), or from
HelpSteer2-Preference rows. Each sample also carries its ``pair_index``, and, once a
reference file is attached, its ``reference_logps`` ``[chosen, rejected]``.

Reference file (JSON lines, written by ``keel data ref-logprobs``): one line per pair,
``{"split": "train"|"validation", "index": i, "chosen": float, "rejected": float,
"fingerprint": int}``, where the fingerprint is a CRC32 of the pair's token ids, so a file
made for other data, another tokenizer or another sequence length is refused.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path
from typing import Any

import torch

from engine.config import ConfigError
from engine.data.convert import helpsteer2_preference_to_bt, helpsteer2_to_dpo
from engine.data.preference import PreferenceDataset
from engine.data.sources import paired_rows
from engine.files import complete_json_lines

logger = logging.getLogger(__name__)

StoredLogprobs = dict[str, dict[int, tuple[float, float, int]]]

_CONVERTERS = {"attributes": helpsteer2_to_dpo, "helpsteer2_preference": helpsteer2_preference_to_bt}


class DPOPairs(PreferenceDataset):
    """Preference pairs for DPO (see the module docstring)."""

    reference: torch.Tensor | None = None

    @classmethod
    def from_config(cls, config: Any, tokenizer: Any) -> tuple[DPOPairs, DPOPairs]:
        """(train, validation) pairs per ``config.data``."""
        data = config.data
        splits = []
        rows_of_splits = paired_rows(data, config.run.seed, config.data_formats())
        for name, rows in zip(("train", "validation"), rows_of_splits, strict=True):
            convert = _CONVERTERS.get(data.format)
            if convert is not None:
                rows, counts = convert(rows)
                logger.info("dpo %s pairs from %s rows: %s", name, data.format, counts)
            source = data.source if name == "train" else f"{data.validation_source or data.source} (validation)"
            splits.append(cls(rows, tokenizer, data.seq_length, template=data.chat_template, overlong=data.overlong,
                              source=source))
        return splits[0], splits[1]

    def fingerprint(self, index: int) -> int:
        """CRC32 of pair ``index``'s chosen and rejected token ids."""
        (chosen, _), (rejected, _), _ = self.pairs[index]
        return zlib.crc32(json.dumps([chosen, rejected]).encode())

    def attach_reference(self, stored: StoredLogprobs, split: str, path: str) -> None:
        """Use stored reference log-probs for every pair; refuses a file made for other pairs."""
        rows = stored.get(split, {})
        if len(rows) != len(self):
            raise ConfigError(f"{path}: has {len(rows)} {split} pairs, the data has {len(self)}; "
                              "rerun keel data ref-logprobs with this run's data settings")
        reference = torch.zeros(len(self), 2, dtype=torch.float32)
        for index in range(len(self)):
            if index not in rows or rows[index][2] != self.fingerprint(index):
                raise ConfigError(f"{path}: {split} pair {index} was computed for other tokens (data, tokenizer, "
                                  "template or seq_length changed); rerun keel data ref-logprobs")
            reference[index] = torch.tensor(rows[index][:2])
        self.reference = reference

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(index)
        item["pair_index"] = torch.tensor(index)
        if self.reference is not None:
            item["reference_logps"] = self.reference[index]
        return item


def read_reference_lines(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a (possibly partial) reference file; a torn last line is ignored."""
    return complete_json_lines(path)


def load_reference_logprobs(path: str) -> StoredLogprobs:
    """``{split: {index: (chosen, rejected, fingerprint)}}`` from a reference file."""
    if not Path(path).is_file():
        raise ConfigError(f"dpo.reference_logprobs={path}: no such file; write it with keel data ref-logprobs")
    stored: StoredLogprobs = {}
    for record in read_reference_lines(Path(path)):
        stored.setdefault(record["split"], {})[int(record["index"])] = (
            float(record["chosen"]), float(record["rejected"]), int(record["fingerprint"]))
    return stored
