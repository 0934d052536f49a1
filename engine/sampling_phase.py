"""The sampling phase every sample-and-train algorithm shares: refit → generate → release → score.

:class:`SamplingPhase` owns the generation backend (built on its own
:class:`~engine.parallel.generation_layout.GenerationParallelState`), the resharding plan from the
trained policy's layout into it, the reward functions (global rank 0) and the reward model. Online RL
(:class:`engine.online_trainer.OnlineTrainer`) runs it once per iteration; the iterative recipes
(:class:`engine.iterative_trainer.IterativeTrainer`: iterative DPO, SteerLM 2.0) run it chunk by
chunk and keep what it made on disk in a :class:`SampleStore`, so an interrupted iteration resumes
without regenerating the chunks that are done.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch

from engine.algorithms.online import REWARD_MODEL_COMPONENT, broadcast_from_first
from engine.data.chat import render_prompt, stop_token_ids
from engine.files import write_json_lines_atomic, write_text_atomic

logger = logging.getLogger(__name__)

# Row i of every held-out sampled evaluation uses seed EVAL_SEED + i: the same draws at each evaluation
# (the differences between evaluations are the policy's), and far from the training rollouts' seeds.
EVAL_SEED = 2**40


class SamplingPhase:
    """Generation backend + resharder + scorers beside a trained policy (a :class:`~engine.runner.ModelRunner`).

    ``step`` provides ``reward_runner(config)`` and ``reward_model(config)`` (see
    :class:`engine.algorithms.online.OnlineStep`); ``config`` has a ``rollout`` section
    (:class:`engine.algorithms.online.RolloutConfig`) and the reward-model fields of
    :class:`engine.algorithms.online.OnlineTrainConfig`.
    """

    def __init__(self, config: Any, parallel: Any, policy: Any, tokenizer: Any, step: Any):
        from engine.generation.native import NativeBackend
        from engine.generation.reshard import Resharder
        from engine.parallel.generation_layout import GenerationParallelState

        rollout = config.rollout
        self.config = config
        self.parallel = parallel
        self.tokenizer = tokenizer
        self.template = config.data.chat_template
        self.stop_ids = tuple(stop_token_ids(tokenizer, self.template))
        generation = GenerationParallelState.initialize(rollout.generation_tensor)
        self.backend = NativeBackend(config, generation, rollout.max_batch_size)
        self.resharder = Resharder(policy.chunks, self.backend, rollout.bucket_mib * 2**20, rollout.refit_transport)
        self.rewards = step.reward_runner(config) if parallel.is_main else None
        self.reward_model = step.reward_model(config)
        self.failures: dict[str, float] = {}  # reward_{errors,timeouts}_<function>: calls since take_failures()

    # ------------------------------------------------------------------ generation
    def sampling(self, seed: int, greedy: bool = False) -> Any:
        """The rollout sampling settings with this run's stop tokens, context and tokenizer vocabulary."""
        params = self.config.rollout.sampling(seed)
        return dataclasses.replace(params, temperature=0.0 if greedy else params.temperature,
                                   stop_token_ids=self.stop_ids, max_length=self.config.data.seq_length,
                                   vocab_size=self.tokenizer.vocab_size)

    def render(self, row: Any, attributes: Optional[str] = None) -> list[int]:
        """Prompt ids of ``row`` (a PromptRow) with the run's template; SteerLM ``attributes`` need ``nemotron``."""
        return render_prompt(row.messages, self.tokenizer, self.template, attributes)

    def decode(self, tokens: list[int], reason: str) -> str:
        return str(self.tokenizer.decode(tokens[:-1] if reason == "stop" else tokens))

    def refit(self) -> float:
        """Reshard the policy's current weights into the backend; returns the seconds it took."""
        began = time.perf_counter()
        self.resharder.reshard()
        return time.perf_counter() - began

    def generate(self, prompts: list[list[int]], seed: int, greedy: bool = False) -> tuple[Any, list[str]]:
        """(rollouts, decoded responses) of ``prompts`` (one row each; repeat a prompt for n samples); the
        backend's memory is released afterwards. Row ``i`` samples with seed ``seed + i``."""
        rollouts = self.backend.generate(prompts, self.sampling(seed, greedy))
        self.backend.release()
        responses = [self.decode(t, r) for t, r in zip(rollouts.tokens, rollouts.finish_reasons, strict=True)]
        return rollouts, responses

    # ------------------------------------------------------------------ scoring
    def score(self, rows: list[Any], responses: list[str],
              lengths: list[int]) -> tuple[torch.Tensor, dict[str, list[float]], list[bool]]:
        """(total reward per rollout, per-component values, keep mask) on every rank.

        The reward model scores on every rank (a collective); the reward functions run on global
        rank 0, which adds the model's component and broadcasts the result. Their failed and timed-out
        calls are added to :attr:`failures`; a function with ``on_error: raise`` that failed raises its
        :class:`~engine.rewards.worker.RewardError` on every rank (not on rank 0 alone, the others left
        waiting for the broadcast).
        """
        from engine.rewards.worker import RewardError

        rm_scores = self.reward_model_scores(rows, responses)
        result: Any = None
        if self.parallel.is_main:
            try:
                result = self._score_on_main(rows, responses, lengths, rm_scores)
            except RewardError as exc:
                result = str(exc)
        result = broadcast_from_first(result)
        if isinstance(result, str):
            raise RewardError(result)
        totals, components, keep, failures = result
        for name, count in failures.items():
            self.failures[name] = self.failures.get(name, 0.0) + count
        return torch.tensor(totals, dtype=torch.float32), components, list(keep)

    def _score_on_main(self, rows: list[Any], responses: list[str], lengths: list[int],
                       rm_scores: Optional[list[float]]) -> tuple[list[float], dict[str, list[float]], list[bool],
                                                                  dict[str, float]]:
        """(totals, components, keep, failure counts) of the reward functions plus the reward model's column."""
        failures: dict[str, float] = {}
        if self.rewards is not None:
            metadata = [{**r.reward_metadata(), "response_tokens": n} for r, n in zip(rows, lengths, strict=True)]
            scored = self.rewards.score([r.text for r in rows], responses, metadata)
            # a function that returns a dict reports its named parts beside its total ("<name>/<key>"; NaN where absent)
            totals, components, keep = scored.totals, {**scored.components, **scored.subscores}, scored.keep
            for kind, counts in (("errors", scored.errors), ("timeouts", scored.timeouts)):
                failures.update({f"reward_{kind}_{name}": float(count) for name, count in counts.items()})
        else:
            totals, components, keep = [0.0] * len(rows), {}, [True] * len(rows)
        if rm_scores is not None:
            keep = [k and not math.isnan(v) for k, v in zip(keep, rm_scores, strict=True)]  # response did not fit
            column = [0.0 if math.isnan(v) else v for v in rm_scores]
            weight = self.config.reward_model_weight
            totals = [t + weight * v if k else 0.0 for t, v, k in zip(totals, column, keep, strict=True)]
            components = {**components, REWARD_MODEL_COMPONENT: column}
        return totals, components, keep, failures

    def take_failures(self) -> dict[str, float]:
        """The reward functions' failed / timed-out calls per function since the last take (metrics)."""
        taken, self.failures = self.failures, {}
        return taken

    def evaluate_held_out(self, rows: list[Any]) -> dict[str, float]:
        """Refit, then answer the held-out ``rows`` greedily, and ``rollout.eval_samples_per_prompt`` times
        each by sampling, scored like the samples: the greedy answers' mean reward, mean response length and
        each reward component's mean; the sampled ones' under ``sampled_``."""
        self.refit()
        training = self.take_failures()  # the evaluation's failed reward calls are its own metrics
        prompts = [self.render(r) for r in rows]
        values = self._scored(rows, *self.generate(prompts, 0, greedy=True))
        per_prompt = self.config.rollout.eval_samples_per_prompt
        if per_prompt:
            repeated = [r for r in rows for _ in range(per_prompt)]
            rollouts, responses = self.generate([p for p in prompts for _ in range(per_prompt)], EVAL_SEED)
            values.update({f"sampled_{k}": v for k, v in self._scored(repeated, rollouts, responses).items()})
        values.update(self.take_failures())
        self.failures = training
        return values

    def _scored(self, rows: list[Any], rollouts: Any, responses: list[str]) -> dict[str, float]:
        scores, components, _ = self.score(rows, responses, rollouts.lengths)
        values = {"reward": float(scores.mean()), "response_length": sum(rollouts.lengths) / len(rows)}
        values.update({f"reward_{name}": mean_present(column, range(len(column))) for name, column in components.items()})
        return values

    def _reward_model_outputs(self, rows: list[Any], responses: list[str]) -> torch.Tensor:
        """The reward model's outputs ``[rows, outputs]`` for each (row's prompt, response) (NaN where it does not fit)."""
        assert self.reward_model is not None
        return self.reward_model.score([(r.prompt, response) for r, response in zip(rows, responses, strict=True)])

    def reward_model_scores(self, rows: list[Any], responses: list[str]) -> Optional[list[float]]:
        """Normalised reward-model goodness (NaN where the response does not fit), or None without a model."""
        if self.reward_model is None:
            return None
        from engine.eval.scoring import GOODNESS_WEIGHTS

        scores = self.reward_model.scalar(self._reward_model_outputs(rows, responses), GOODNESS_WEIGHTS)
        config = self.config
        return ((scores - config.reward_model_mean) / config.reward_model_std).tolist()

    def reward_model_attributes(self, rows: list[Any], responses: list[str]) -> tuple[list[str], list[list[float]]]:
        """(attribute names, the regression reward model's predicted attributes per response; NaN where the
        response does not fit) on every rank."""
        if self.reward_model is None or self.reward_model.step.rm.type != "regression":
            raise RuntimeError("predicted attributes need a regression reward model (reward_model=<checkpoint>)")
        return list(self.reward_model.step.rm.attributes), self._reward_model_outputs(rows, responses).tolist()

    def close(self) -> None:
        if self.rewards is not None:
            self.rewards.close()


def mean_present(column: list[float], rows: Any) -> float:
    """The mean of ``column`` over ``rows``, leaving out NaN (a sub-score a dict reward left out); NaN when none."""
    present = [column[i] for i in rows if not math.isnan(column[i])]
    return sum(present) / len(present) if present else math.nan


class SampleStore:
    """What one iteration sampled, on disk: ``<run>/iterations/iter_<k>/``.

    * ``chunks/chunk_<c>.jsonl``: the samples of chunk ``c`` (a batch of prompts, n samples each), written
      by global rank 0 to a temporary name, fsynced and renamed, so a chunk file is complete or absent;
    * ``samples.jsonl``: every chunk's samples in order, written when the last chunk is done;
    * ``pairs.jsonl`` / ``weights.jsonl`` (what the recipe trains on) and ``summary.json``.

    A killed iteration, started again, reads the complete chunks and generates only the others.
    """

    def __init__(self, run_dir: str, iteration: int, writes: bool):
        self.dir = Path(run_dir) / "iterations" / f"iter_{iteration}"
        self.writes = writes
        if writes:
            (self.dir / "chunks").mkdir(parents=True, exist_ok=True)

    def check_inputs(self, inputs: dict[str, Any]) -> None:
        """Refuse chunks on disk that other inputs made (other prompts, sampling, rewards...); else record
        ``inputs`` for the next start. A resumed chunk was matched by prompt index alone, so a rerun with another
        prompt file or reward paired old responses with new prompts. Directories from before this record pass,
        and so does an entry the record did not have yet (the starting policy came later)."""
        path = self.dir / "inputs.json"
        inputs = json.loads(json.dumps(inputs, sort_keys=True))  # as it reads back (lists, not tuples)
        differs = None
        if self.writes:
            stored = json.loads(path.read_text()) if path.is_file() else None
            if stored is None:
                write_text_atomic(path, json.dumps(inputs, indent=2, sort_keys=True) + "\n")
            elif stored != (now := {key: inputs.get(key) for key in stored}):
                differs = changed_settings(stored, now)
        differs = broadcast_from_first(differs)
        if differs:
            from engine.errors import ConfigError

            raise ConfigError(f"{self.dir} holds samples made with other settings than this run's ({'; '.join(differs)}): "
                              "rerun with the settings it was started with, or delete that directory to sample it "
                              "again")

    def chunk_path(self, chunk: int) -> Path:
        return self.dir / "chunks" / f"chunk_{chunk:05d}.jsonl"

    def done_chunks(self, count: int) -> dict[int, list[dict[str, Any]]]:
        """``{chunk: samples}`` of the complete chunks among ``0..count-1`` (read on rank 0, sent to every rank)."""
        found: dict[int, list[dict[str, Any]]] = {}
        if self.writes:
            for chunk in range(count):
                path = self.chunk_path(chunk)
                if path.is_file():
                    found[chunk] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        done: dict[int, list[dict[str, Any]]] = broadcast_from_first(found)
        return done

    def write_chunk(self, chunk: int, samples: list[dict[str, Any]]) -> None:
        if self.writes:
            write_json_lines_atomic(self.chunk_path(chunk), samples, sort_keys=True)

    def write_jsonl(self, name: str, rows: list[dict[str, Any]]) -> None:
        if self.writes:
            write_json_lines_atomic(self.dir / name, rows, sort_keys=True)

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.writes:
            write_text_atomic(self.dir / "summary.json",
                              json.dumps(_finite(summary), indent=2, sort_keys=True, allow_nan=False) + "\n")


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None: JSON has no NaN (a gap of an iteration without pairs)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# the settings behind each entry of an iteration's inputs.json (IterativeTrainer.sampling_inputs), in order
INPUT_SETTINGS = {
    "prompts": "the prompts (rollout.prompts, rollout.num_prompts, rollout.prompts_per_iteration, run.seed, the "
               "steerlm2 targets)",
    "policy": ("checkpoint.load", "model"),
    "sampling": ("rollout.samples_per_prompt", "rollout.max_new_tokens", "rollout.temperature", "rollout.top_p",
                 "rollout.top_k", "iterative.chunk_prompts", "run.seed"),
    "template": ("data.tokenizer", "data.chat_template", "data.seq_length"),
    "rewards": ("reward_functions", "reward_model", "reward_model_weight", "reward_model_mean", "reward_model_std"),
}


def changed_settings(stored: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``setting: then -> now`` for each setting whose value differs between two inputs records."""
    changed = []
    for key in sorted({*stored, *now}):
        then, value = stored.get(key), now.get(key)
        if then == value:
            continue
        names = INPUT_SETTINGS.get(key, key)
        if isinstance(names, str) or not (isinstance(then, list) and isinstance(value, list)
                                          and len(then) == len(value) == len(names)):
            changed.append(names if isinstance(names, str) else key)
            continue
        for name, a, b in zip(names, then, value, strict=True):
            if isinstance(a, dict) and isinstance(b, dict):  # a config section: its fields
                changed += [f"{name}.{field}: {_brief(a.get(field))} -> {_brief(b.get(field))}"
                            for field in sorted({*a, *b}) if a.get(field) != b.get(field)]
            elif a != b:
                changed.append(f"{name}: {_brief(a)} -> {_brief(b)}" if _brief(a) != _brief(b) else
                               f"{name} (in its details)")
    return changed


def _brief(value: Any, limit: int = 60) -> str:
    """``value`` as JSON in at most ``limit`` characters: a string keeps its end (a path's distinct part)."""
    text = json.dumps(value)
    if len(text) <= limit:
        return text
    return "..." + text[3 - limit:] if isinstance(value, str) else text[: limit - 3] + "..."
