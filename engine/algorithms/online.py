"""The iteration every online algorithm shares (GRPO, REINFORCE/RLOO, later PPO).

One training "step" of the loop (:class:`engine.trainer.Trainer`) is one iteration:

1. **refit**: reshard the policy's weights from the training layout into the generation
   backend (:mod:`engine.generation.reshard`, plan made once);
2. **generate**: ``samples_per_prompt`` rollouts for each of ``prompts_per_iteration``
   prompts on the backend's own layout (every replica takes a share);
3. **release** the backend's KV cache;
4. **score**: reward functions (on global rank 0, in a worker pool; the result is broadcast)
   and/or a reward model;
5. **recompute** the rollouts' log-probs with the training model (the ratio's ``π_old``,
   never the backend's numbers) and with the frozen reference (for the KL);
6. **train**: ``epochs`` passes over the rollout buffer in optimizer steps of
   ``data.global_batch_size`` sequences, sharded over data-parallel ranks;

and the loop's checkpointing, SIGTERM handling, metrics and progress bar apply per iteration.
The buffer (prompts × samples) is independent of the optimizer batch. Prompts are drawn by a
resumable sampler and every random choice is seeded by the iteration number, so a run killed
mid-iteration and started again repeats that iteration exactly. Each phase is timed
(``time_refit`` ... ``time_train``) and logged with the iteration's metrics.

An algorithm is an :class:`OnlineStep`: it turns scores into per-token advantages and defines
the per-token loss; this module owns everything else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
import torch.distributed as dist

from engine.algorithms.base import Batch, Step
from engine.algorithms.logprobs import lm_forward, per_token_logprobs, sequence_batches
from engine.config import ConfigError, TrainConfig, doc
from engine.generation.base import Rollouts, SamplingParams
from engine.generation.host_shared import TRANSPORTS
from engine.rewards import RewardFunctionConfig, parse_reward_configs

logger = logging.getLogger(__name__)

PHASES = ("refit", "generate", "score", "logprobs", "train")
REWARD_MODEL_COMPONENT = "rm"  # the reward model's component of the reward (logged as reward_rm)


@dataclass
class RolloutConfig:
    prompts: str = doc("Prompt set: JSONL of {prompt, answer?, ...} rows or builtin:prompts[:split].",
                       "builtin:prompts")
    eval_prompts: Optional[str] = doc(
        "Held-out prompts answered greedily at run.eval_interval: a prompt set, null/none (no evaluation) or auto "
        "(the built-in eval split when rollout.prompts is builtin:prompts, else none: set your own held-out file).",
        "auto")
    num_prompts: int = doc("Prompts drawn from a builtin: set (a file is read whole).", 4096)
    eval_num_prompts: int = doc("Held-out prompts evaluated at run.eval_interval (greedy): drawn from a builtin: set, "
                                "the first ones of a file.", 64)
    eval_samples_per_prompt: int = doc(
        "Held-out samples per prompt at the rollouts' temperature/top-p/top-k, besides the greedy answer (0 = greedy "
        "only). Their mean reward (validation sampled_reward) is what the policy's own samples earn on unseen "
        "prompts; the seeds are the same at every evaluation, so evaluations differ only by the policy.", 0)
    prompts_per_iteration: int = doc("Prompts per iteration.", 16)
    samples_per_prompt: int = doc("Rollouts per prompt (GRPO's G, RLOO's k).", 4)
    generation_tensor: int = doc("Tensor-parallel size of the generation layout.", 1)
    max_new_tokens: int = doc("Longest response.", 48)
    temperature: float = doc("Sampling temperature of the rollouts.", 1.0)
    top_p: float = doc("Nucleus sampling of the rollouts.", 1.0)
    top_k: int = doc("Top-k sampling of the rollouts (0 = off).", 0)
    max_batch_size: int = doc("Rows decoded together per generation replica.", 64)
    bucket_mib: int = doc("Resharding bucket size (MiB): bounds the extra memory of a refit.", 64)
    refit_transport: str = doc("How a refit moves the weights: collective (point-to-point sends, any hosts), "
                               "shared (one copy of the generation weights per host and generation TP rank in "
                               "/dev/shm, written once per refit; ranks on one host, weights in host memory) or "
                               "auto (shared where it applies).", "auto")
    epochs: int = doc("Passes over each iteration's rollouts.", 1)

    def __post_init__(self) -> None:
        for name in ("num_prompts", "prompts_per_iteration", "samples_per_prompt", "generation_tensor",
                     "max_new_tokens", "max_batch_size", "bucket_mib", "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rollout.{name}={getattr(self, name)} must be >= 1")
        if self.eval_samples_per_prompt < 0:
            raise ConfigError(f"rollout.eval_samples_per_prompt={self.eval_samples_per_prompt} must be >= 0")
        if self.refit_transport not in TRANSPORTS:
            raise ConfigError(f"rollout.refit_transport={self.refit_transport!r}: expected one of {', '.join(TRANSPORTS)}")
        self.sampling(0)  # temperature/top-p/top-k checked now, not at the first iteration

    def held_out_source(self) -> Optional[str]:
        """The prompt set ``eval_prompts`` names (None: no held-out evaluation)."""
        if self.eval_prompts is None or self.eval_prompts.lower() == "none":
            return None
        if self.eval_prompts != "auto":
            return self.eval_prompts
        return "builtin:prompts:eval" if self.prompts in ("builtin:prompts", "builtin:prompts:train") else None

    @property
    def buffer_size(self) -> int:
        return self.prompts_per_iteration * self.samples_per_prompt

    def sampling(self, seed: int) -> SamplingParams:
        return SamplingParams(self.max_new_tokens, self.temperature, self.top_p, self.top_k, seed)


@dataclass
class OnlineTrainConfig(TrainConfig):
    """Shared sections of the online algorithms; each adds its own."""

    ALGORITHM: ClassVar[str] = "online"  # default run directory runs/<ALGORITHM>
    GROUP_NEEDS: ClassVar[str] = ""  # why rollouts of a prompt are compared (then >= 2 are needed)
    BUFFER_IS_BATCH: ClassVar[bool] = True  # the rollout buffer is split into optimizer steps (online RL)
    FINE_TUNE_LR: ClassVar[Optional[float]] = 1e-6
    FROZEN: ClassVar[tuple[str, ...]] = ("reference", "reward_model")  # pinned to a step (engine.checkpoint.pinning)
    # the other algorithms' data settings, and the rollout settings that do their work when sampling from prompts
    UNREAD: ClassVar[dict[str, str]] = {"data.source": "rollout.prompts", "data.validation_source": "rollout.eval_prompts",
                                        "data.num_samples": "rollout.num_prompts"}
    IGNORED: ClassVar[dict[str, str]] = {
        "data.pack": "each rollout is its own sample, never packed with others",
        "data.loss_on": "the loss is on the tokens each rollout generated",
        "data.validation_fraction": "held-out prompts come from rollout.eval_prompts (auto: a built-in set's "
                                    "unseen split), never from the training prompts",
        "data.overlong": "prompts are never cut or dropped: one that leaves no room to generate within "
                         "data.seq_length is refused",
        "run.eval_batches": "each evaluation answers the held-out prompts, rollout.eval_num_prompts of them",
    }

    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward_functions: Optional[list[RewardFunctionConfig]] = field(
        default=None,
        metadata={"doc": "Reward functions, each {name, weight, kwargs, timeout_seconds, on_error (zero|skip|raise), "
                         "label}; name is a registered function or module:function. Unset: synthetic_check for "
                         "builtin:prompts without a reward_model, else none (your prompts need your reward)."})
    reward_workers: int = doc("Reward worker processes (0 = in the trainer's process, no timeouts).", 2)
    reward_model: Optional[str] = doc(
        "Reward-model checkpoint (`keel train rm`) scoring every rollout as the component 'rm', built at the "
        "training layout. Regression models give their goodness (helpfulness-weighted attributes), BT ones their score.",
        None)
    reward_model_weight: float = doc("Weight of the reward model's component in the total reward.", 1.0)
    reward_model_mean: float = doc("Stored mean subtracted from the reward model's score (normalisation).", 0.0)
    reward_model_std: float = doc("Stored std the centred reward-model score is divided by.", 1.0)
    reference: Optional[str] = doc(
        "Checkpoint of the frozen KL reference (None = checkpoint.load; 'init' = the weights the policy starts "
        "from: checkpoint.load when given, else the seeded initialisation).", None)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.run.output_dir == "runs/sft-demo":
            self.run.output_dir = f"runs/{self.ALGORITHM}"
            self.checkpoint.dir = f"runs/{self.ALGORITHM}/checkpoints"
        self.refuse_unread_data()
        self.refuse_identical_groups()
        if self.reward_functions is None:  # the synthetic checker only knows the built-in tasks' phrasing
            builtin = self.rollout.prompts.startswith("builtin:prompts") and not self.reward_model
            self.reward_functions = [RewardFunctionConfig("synthetic_check")] if builtin else []
        self.reward_functions = parse_reward_configs(self.reward_functions, "reward_functions")
        if self.reward_model and any(f.component == REWARD_MODEL_COMPONENT for f in self.reward_functions):
            raise ConfigError(f"reward_functions: a function reported as {REWARD_MODEL_COMPONENT!r} would be overwritten "
                              "by the reward model's component of that name; give it another 'label'")
        self.check_reward()
        if self.reward_model_std <= 0:
            raise ConfigError(f"reward_model_std={self.reward_model_std} must be > 0")
        if self.reference is None:
            self.reference = self.checkpoint.load

    def check_checkpoints(self) -> None:
        """A reference that is a scorer, or a reward model that is none (read from their keel.json before any
        model is built: a policy named as the reward model was refused only after the models and the plan)."""
        from engine.checkpoint.dist import refuse_scorer_policy
        from engine.eval.scoring import reward_model_config

        if self.reference != self.checkpoint.load:  # checkpoint.load is checked as the policy's start
            refuse_scorer_policy(self.reference, "reference")
        if self.reward_model:
            reward_model_config(self.reward_model, setting="reward_model")

    def check_named_code(self) -> None:
        """Every reward function imports, and takes the call and kwargs the run gives it (in one process; the
        trainer checks on rank 0, :func:`check_imports`)."""
        for index, function in enumerate(self.reward_functions or []):
            problem = function_problem(function)
            if problem:
                raise ConfigError(f"reward_functions[{index}]: {problem}")

    def refuse_unread_data(self) -> None:
        """A ``data`` setting these runs do not read is refused, naming the ``rollout`` one they do: a user coming
        from TRL sets ``data.source=prompts.jsonl`` and trained on the built-in prompts without a word."""
        for name, value in self.set_otherwise(self.UNREAD):
            raise ConfigError(f"{name}={value} is not read by {self.ALGORITHM}, which samples from prompts: "
                              f"set {self.UNREAD[name]}={value} instead")

    def refuse_identical_groups(self) -> None:
        """Where the rollouts of a prompt are compared, one rollout or greedy decoding (all of a prompt's rollouts
        the same) leaves nothing to compare: every run would train on zero advantages or no pairs."""
        if not self.GROUP_NEEDS:
            return
        rollout = self.rollout
        if rollout.samples_per_prompt < 2:
            raise ConfigError(f"{self.GROUP_NEEDS}: rollout.samples_per_prompt={rollout.samples_per_prompt} must be >= 2")
        greedy = ("rollout.temperature=0 (greedy)" if rollout.temperature == 0
                  else "rollout.top_k=1" if rollout.top_k == 1 else None)
        if greedy:
            raise ConfigError(f"{greedy} makes every rollout of a prompt the same, and {self.GROUP_NEEDS}: sample "
                              "(e.g. rollout.temperature=1.0, rollout.top_k=0)")

    def check_reward(self) -> None:
        """Some reward is configured (when the config is built)."""
        if not self.reward_functions and not self.reward_model:
            raise ConfigError(f"no reward for rollout.prompts={self.rollout.prompts}: set reward_functions (e.g. "
                              "'[{name: math_answer}]', which checks each row's answer field, or your module:function) "
                              "or reward_model=<checkpoint>")

    def validate(self, world_size: int) -> None:
        super().validate(world_size)
        from engine.models.presets import resolve_preset
        from engine.parallel.generation_layout import GenerationLayout
        GenerationLayout.for_world(self.rollout.generation_tensor, world_size, resolve_preset(self.model),
                                   named=f"rollout.generation_tensor={self.rollout.generation_tensor}")
        if self.BUFFER_IS_BATCH and self.rollout.buffer_size % self.data.global_batch_size:
            raise ConfigError(
                f"the rollout buffer (rollout.prompts_per_iteration x rollout.samples_per_prompt = "
                f"{self.rollout.buffer_size}) must be a multiple of data.global_batch_size ({self.data.global_batch_size})")


class PromptSampling:
    """What every algorithm that samples from prompts needs: the prompt sets (train, held-out) of
    ``rollout``, the reward functions and the reward model (online RL, iterative DPO, SteerLM 2.0)."""

    name: str

    def reward_runner(self, config: Any) -> Any:
        """The reward functions of ``config.reward_functions`` (built on global rank 0 only; None without any)."""
        from engine.rewards import RewardRunner

        return RewardRunner(config.reward_functions, config.reward_workers) if config.reward_functions else None

    def reward_model(self, config: Any) -> Any:
        """A :class:`~engine.eval.scoring.RewardScorer` of ``config.reward_model`` at the training layout, or None."""
        if not config.reward_model:
            return None
        from engine.eval.scoring import load_scorer

        layout = [f"parallel.tensor={config.parallel.tensor}", f"parallel.pipeline={config.parallel.pipeline}",
                  f"data.seq_length={config.data.seq_length}", f"data.micro_batch_size={config.data.micro_batch_size}",
                  f"data.chat_template={config.data.chat_template}", f"data.tokenizer={config.data.tokenizer}"]
        scorer = load_scorer(config.reward_model, layout)
        logger.info("%s: reward model %s (%s) scores every rollout with weight %g", self.name, config.reward_model,
                    scorer.step.rm.type, config.reward_model_weight)
        return scorer

    def build_datasets(self, config: Any, tokenizer: Any) -> tuple[Any, Any]:
        """The training and held-out prompts: validated, and only those the reward functions can judge
        (:func:`engine.rewards.config.check_judged`)."""
        from engine.data.prompts import load_prompts
        from engine.rewards.config import check_judged

        rollout = config.rollout
        on_error = config.data.on_error
        train = check_judged(config.reward_functions or [],
                             load_prompts(rollout.prompts, rollout.num_prompts, config.run.seed, on_error), on_error)
        if len(train) < rollout.prompts_per_iteration:
            logger.warning("rollout.prompts_per_iteration=%d exceeds the %d prompts of %s: every iteration asks "
                           "some prompts more than once", rollout.prompts_per_iteration, len(train), rollout.prompts)
        source = rollout.held_out_source()
        if source is None and rollout.eval_prompts == "auto":
            logger.info("rollout.eval_prompts=auto: no held-out prompts for %s (none are taken from it); set "
                        "rollout.eval_prompts=<prompts never trained on> for greedy evaluation", rollout.prompts)
        held_out = load_prompts(source, rollout.eval_num_prompts, config.run.seed, on_error) if source else []
        held_out = check_judged(config.reward_functions or [], held_out, on_error)
        if len(held_out) > rollout.eval_num_prompts:
            logger.info("held-out evaluation: the first %d of the %d prompts of %s (rollout.eval_num_prompts)",
                        rollout.eval_num_prompts, len(held_out), source)
            held_out = held_out[:rollout.eval_num_prompts]
        return train, held_out

    def check_datasets(self, config: Any, tokenizer: Any, train: Any, valid: Any) -> None:
        """The reward modules import, and every prompt leaves room to generate within ``data.seq_length``: one
        error naming its file, line and field before the models are built (the backend's own check would come at
        the prompt's first turn, maybe hours in)."""
        from engine.data.chat import render_prompt
        from engine.data.errors import DataError, Shown

        rows = [*train, *valid]
        check_imports(config.reward_functions or [])
        limit, template = config.data.seq_length, config.data.chat_template
        lengths = []
        for row in rows:
            length = len(render_prompt(row.messages, tokenizer, template))
            if length >= limit:
                raise DataError(row.where, "prompt", f"fewer than data.seq_length={limit} tokens with the "
                                f"{template!r} template, to leave room to generate", Shown(f"{length} tokens"),
                                hint="shorten or drop it, or raise data.seq_length")
            lengths.append(length)
        from engine.models.presets import resolve_preset

        self._check_room(config, lengths, self.judges_by_max_new_tokens(),
                         resolve_preset(config.model).max_sequence_length)

    def judges_by_max_new_tokens(self) -> str:
        """The setting, as ``name=value``, that judges responses by reaching ``rollout.max_new_tokens`` (GRPO's
        overlong filter or penalty); empty when none does."""
        return ""

    @staticmethod
    def _check_room(config: Any, lengths: list[int], judge: str = "", context: Optional[int] = None) -> None:
        """Prompts that leave fewer than ``rollout.max_new_tokens`` tokens within ``data.seq_length`` have their
        responses cut by the sequence: said once. A ``judge`` of responses by max_new_tokens (GRPO's overlong
        filter or penalty), which such responses never reach (81% cut, none penalised, and nothing said): refused.
        The advice stays within the model's ``context`` (its max_sequence_length)."""
        limit, wanted = config.data.seq_length, config.rollout.max_new_tokens
        short = [length for length in lengths if limit - length < wanted]
        if not short:
            return
        needed = max(lengths) + wanted
        advice = f"data.seq_length={needed} lets every response reach max_new_tokens"
        if context is not None and needed > context:
            advice = (f"the model's context of {context} tokens leaves the longest prompt room for "
                      f"{context - max(lengths)}: lower rollout.max_new_tokens to that, and raise data.seq_length "
                      f"to {context}" if limit < context else f"lower rollout.max_new_tokens to {limit - max(lengths)}")
        what = (f"{len(short)} of {len(lengths)} prompts leave fewer than rollout.max_new_tokens={wanted} tokens "
                f"within data.seq_length={limit} (as few as {limit - max(short)}), so their responses are cut at "
                f"the sequence's end; {advice}")
        if judge:
            raise ConfigError(f"{judge} judges responses by rollout.max_new_tokens, and {what}: "
                              "raise data.seq_length, or lower rollout.max_new_tokens")
        logger.warning(what)


class OnlineStep(PromptSampling, Step):
    """An online algorithm: advantages from scores, and a per-token loss on the rollout micro-batches.

    Micro-batches carry ``tokens``, ``labels``, ``loss_mask`` (response tokens), ``old_logps``,
    ``ref_logps`` and ``advantages`` (``[rows, seq]``, aligned with ``labels``).
    """

    online = True  # run by engine.online_trainer.OnlineTrainer
    uses_reference: bool = True
    reference: Any = None
    parallel: Any = None
    config: Any = None

    def setup(self, config: Any, parallel: Any, tokenizer: Any) -> None:
        """The frozen KL reference (when the algorithm uses one)."""
        from engine.runner import ModelRunner, starting_weights

        self.parallel = parallel
        if self.uses_reference:
            checkpoint = starting_weights(config.reference, config.checkpoint.load)
            self.reference = ModelRunner.frozen(config, parallel, self.model_class(), checkpoint)
            if config.reference is None:  # neither reference nor checkpoint.load given: say what that means
                logger.warning("%s: no checkpoint.load, so the policy and its KL reference start from the seeded "
                               "initialisation; set checkpoint.load=<SFT checkpoint> (the usual start), or "
                               "reference=init to say this is meant", self.name)
            else:
                logger.info("%s: frozen KL reference from %s", self.name, checkpoint or "the policy's initialisation")

    def reward_metrics(self) -> tuple[str, ...]:
        """The ``reward_<component>`` metric of each reward the run configured, as the trainer logs them: every
        reward function under its label (else its name), then the reward model's component."""
        names = [function.component for function in self.config.reward_functions or []]
        if self.config.reward_model:
            names.append(REWARD_MODEL_COMPONENT)
        return tuple(f"reward_{name}" for name in names)

    def curve_metrics(self) -> tuple[str, ...]:
        """Metrics drawn into the run's curves.png: the total reward, each of its components, the KL, the length."""
        return ("reward", *self.reward_metrics(), *(("kl",) if self.uses_reference else ()), "response_length")

    def reward_shaping(self, rollouts: Rollouts) -> Optional[torch.Tensor]:
        """A term per rollout that :meth:`advantages` adds to the rewards (GRPO's overlong penalty), or None. The
        trainer logs it, and counts tied groups on the shaped rewards."""
        return None

    def advantages(self, scores: torch.Tensor, rollouts: Rollouts, logps: list[list[float]],
                   ref_logps: list[list[float]], values: Optional[list[list[float]]] = None,
                   keep: Optional[list[bool]] = None) -> dict[str, list[list[float]]]:
        """Per-token ``advantages`` of every rollout (rows grouped by prompt, ``samples_per_prompt`` each), and
        any other per-token value the loss reads (PPO: ``returns``, ``old_values``). ``keep``: False for a
        rollout the rewards skipped (its score is a placeholder 0): it takes no part in any baseline."""
        raise NotImplementedError

    def build_critic(self, config: Any, parallel: Any, resumed: Optional[Any] = None) -> Any:
        """The value model, for algorithms that have one (PPO; ``resumed``: the critic checkpoint the run resumes,
        whose head it rebuilds); None otherwise."""
        return None

    def forward(self, model: torch.nn.Module, batch: Batch, parallel: Optional[Any] = None) -> torch.Tensor:
        return lm_forward(model, batch)

    def token_logps(self, batch: Batch, output: torch.Tensor) -> torch.Tensor:
        logps: torch.Tensor = per_token_logprobs(output, batch["labels"], batch["loss_mask"], self.parallel)
        return logps.float()


@dataclass
class Iteration:
    """What one iteration made, on every rank."""

    rows: list[Any]  # the prompt rows, each repeated samples_per_prompt times
    prompts: list[list[int]]
    rollouts: Rollouts
    scores: torch.Tensor
    components: dict[str, list[float]]
    keep: list[bool]
    responses: list[str] = field(default_factory=list)
    times: dict[str, float] = field(default_factory=dict)


def check_imports(functions: list[Any]) -> None:
    """Import each reward function on global rank 0 (where its workers run) and check the call the run makes
    (:func:`function_problem`) before the models are built, and raise what went wrong as one :class:`ConfigError`
    on every rank: a typo in a module name was reported after the models were built and the weights resharded
    (minutes at scale), a signature that does not fit after the models were built."""
    problem: Optional[str] = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        problem = next(filter(None, map(function_problem, functions)), None)
    problem = broadcast_from_first(problem)
    if problem:
        raise ConfigError(problem)


def function_problem(function: Any) -> Optional[str]:
    """Why the reward function of config ``function`` cannot be called as the run calls it: its module does not
    import, or its signature or kwargs do not fit (a TRL-style ``fn(completions, solution, **kwargs)``); None
    when it can."""
    from engine.rewards.registry import resolve_reward

    try:
        resolved = resolve_reward(function.name)
    except ConfigError as exc:
        return str(exc)
    except Exception as exc:  # the user's module failed while it was imported
        return f"reward function {function.name!r}: importing it raised {type(exc).__name__}: {exc}"
    try:
        resolved.validate_kwargs(function.kwargs)
    except ConfigError as exc:
        return str(exc)
    except Exception as exc:  # its own kwargs check, or a signature inspect cannot read
        return f"reward function {function.name!r}: checking its call raised {type(exc).__name__}: {exc}"
    return None


def broadcast_from_first(value: Any) -> Any:
    """``value`` of global rank 0 on every rank (a picklable object)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rollout_micro_batches(sequences: list[list[int]], prompt_lengths: list[int], per_token: dict[str, list[list[float]]],
                          rows: list[int], micro_batch_size: int, widths: list[int]) -> list[Batch]:
    """Micro-batches of the rollout rows ``rows`` (this rank's share), micro-batch ``k`` ``widths[k]`` wide.

    Per-token values (one per response token) are placed at the label positions of their tokens.
    """
    batches = []
    for first, width in zip(range(0, len(rows), micro_batch_size), widths, strict=True):
        chosen = rows[first: first + micro_batch_size]
        batch = sequence_batches([sequences[i] for i in chosen], [prompt_lengths[i] for i in chosen],
                                 micro_batch_size, width=width)[0]
        for name, values in per_token.items():
            tensor = torch.zeros(micro_batch_size, width)
            for slot, i in enumerate(chosen):
                start = prompt_lengths[i] - 1
                tensor[slot, start: start + len(values[i])] = torch.tensor(values[i])
            batch[name] = tensor
        batches.append(batch)
    return batches
