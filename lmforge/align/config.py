"""The alignment stages' config sections. Torch-free; part of `RunConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.errors import ConfigError

DPO_LOSSES = ("sigmoid", "ipo", "sigmoid_norm")
# builtin:prefs' default prompt mix. builtin:chat's own shares spend 45% of the prompts on
# arithmetic, which a fine-tuned model mostly gets right every time (no pair), and 23% on the
# corpus tasks, which it mostly gets wrong every time; this mix found 155 pairs in 256 prompts on
# the tiny SFT model against builtin:chat's 25 in 129 (benchmarks/RESULTS.md).
PREFS_TASKS = ("letters:0.6", "identity:0.15", "arithmetic:0.25")


@dataclass
class DpoConfig:
    """Direct preference optimisation (lmforge/align/dpo.py).

    data: preference pairs, each `SOURCE` or `SOURCE:WEIGHT`: a JSONL file of {"prompt", "chosen",
        "rejected"} records (each a string or a list of chat messages), or `builtin:prefs`: pairs
        the policy itself samples for the verifiable builtin:chat prompts, right vs wrong.
    loss: "sigmoid" (DPO: -log sigmoid(beta x margin of log-ratios)), "ipo" ((margin -
        1/(2 beta))^2 on summed log-ratios), or "sigmoid_norm" (DPO on log-ratios averaged per
        answer token: no pull towards longer or shorter answers; wants a larger beta, ~1-2).
    beta: strength of the pull towards the reference model (larger: stay closer).
    label_smoothing: assumed share of flipped labels (conservative DPO), "sigmoid" losses only.
    nll_weight: weight of a language-model loss on the chosen answers (their negative
        log-likelihood per token) added to the preference loss (RPO, Pang et al. 2024): DPO alone
        may push both answers down, the chosen ones too, until the model's answers fall apart;
        this term keeps the right answers likely. 0: plain DPO. (Measured on the tiny SFT model it
        halved the held-out accuracy lost to over-fitting; benchmarks/RESULTS.md.)
    val_fraction: share of a file's pairs held out (by content hash) for the held-out metrics.
    prefs_prompts / prefs_val_prompts: builtin:prefs prompts drawn from the train / test split.
    prefs_tasks: which verifiable tasks give those prompts, each `TASK` or `TASK:WEIGHT` (shares
        normalised); empty: builtin:chat's own shares. Only prompts the model sometimes gets right
        and sometimes wrong give pairs, so the shares should favour the tasks with room to improve
        (the default, PREFS_TASKS: the tiny SFT model's letters and identity, and some arithmetic).
    prefs_samples: answers sampled per prompt (at prefs_temperature, at most prefs_max_tokens).
    prefs_greedy: also the greedy answer (temperature 0), paired first: its mistakes are the
        model's most likely ones.
    prefs_pairs: at most this many (right, wrong) pairs per prompt.
    prefs_strict: a chosen answer must be right by its working too (Task.check_work: for letters,
        the right spelling and positions), not only in its final answer; an answer right by luck
        is then neither chosen nor rejected.
    max_epochs: with a time budget, the most passes over the training pairs it may size the run
        to (0: no limit). A budget sizes the steps to its seconds, which for a few hundred pairs
        is dozens of epochs, and DPO over-fits its pairs (benchmarks/RESULTS.md); an explicit
        train.max_steps without a budget is not limited.
    eval_examples: with builtin:prefs, test-split questions of prefs_tasks (in their shares)
        answered greedily at every evaluation: the held-out `pass_at_1` (0: not measured).
    select_best: the run's result is its checkpoint with the highest pass_at_1 (step 0, the
        starting model, included), named in RUN_DIR/checkpoints/selected.json and loaded for the
        run directory; false (or no pass_at_1): the last checkpoint.
    """

    data: list[str] = field(default_factory=lambda: ["builtin:prefs"])
    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    nll_weight: float = 1.0
    val_fraction: float = 0.05
    prefs_prompts: int = 512
    prefs_val_prompts: int = 64
    prefs_tasks: list[str] = field(default_factory=lambda: list(PREFS_TASKS))
    prefs_samples: int = 8
    prefs_temperature: float = 1.0
    prefs_max_tokens: int = 128
    prefs_greedy: bool = True
    prefs_pairs: int = 2
    prefs_strict: bool = False
    max_epochs: float = 3.0
    eval_examples: int = 128
    select_best: bool = True

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("dpo.data is empty: name at least one pairs file or builtin:prefs")
        if self.loss not in DPO_LOSSES:
            raise ConfigError(f"dpo.loss={self.loss!r} must be one of: {', '.join(DPO_LOSSES)}")
        if not self.beta > 0:
            raise ConfigError(f"dpo.beta={self.beta} must be > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.label_smoothing and self.loss == "ipo":
            raise ConfigError("dpo.label_smoothing applies to the sigmoid losses, not dpo.loss=\"ipo\"")
        if self.nll_weight < 0:
            raise ConfigError(f"dpo.nll_weight={self.nll_weight} must be >= 0")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"dpo.val_fraction={self.val_fraction} must be in [0, 1)")
        for name in ("prefs_prompts", "prefs_samples", "prefs_max_tokens", "prefs_pairs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"dpo.{name}={getattr(self, name)} must be >= 1")
        if self.prefs_samples < 2:
            raise ConfigError(f"dpo.prefs_samples={self.prefs_samples} must be >= 2 to find a right "
                              "and a wrong answer")
        for item in self.prefs_tasks:
            name, _, weight = item.partition(":")
            try:
                ok = bool(name) and (not weight or float(weight) > 0)
            except ValueError:
                ok = False
            if not ok:
                raise ConfigError(f"dpo.prefs_tasks: {item!r} is not TASK or TASK:WEIGHT with a weight > 0")
        for name in ("prefs_val_prompts", "eval_examples", "max_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"dpo.{name}={getattr(self, name)} must be >= 0")
        if not self.prefs_temperature > 0:
            raise ConfigError(f"dpo.prefs_temperature={self.prefs_temperature} must be > 0")


@dataclass
class RewardConfig:
    """Reward models (lmforge/align/reward.py): a transformer with a scalar head, trained with the
    Bradley-Terry loss -log sigmoid(score(chosen) - score(rejected)).

    data: preference pairs, as dpo.data (files or builtin:prefs).
    val_fraction: share of a file's pairs held out (by content hash) for the pairwise accuracy.
    """

    data: list[str] = field(default_factory=lambda: ["builtin:prefs"])
    val_fraction: float = 0.1

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("reward.data is empty: name at least one pairs file or builtin:prefs")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"reward.val_fraction={self.val_fraction} must be in [0, 1)")


@dataclass
class GrpoConfig:
    """RL with verifiable rewards (`lmforge grpo`, lmforge/align/grpo.py).

    tasks: built-in tasks whose train split gives the prompts and whose checker gives the reward
        (lmforge.tasks.make_tasks: arithmetic, letters, identity, shakespeare, bible, docstrings),
        or "chat" (the default) for every verifiable one, each in its builtin:chat share: the
        tasks SFT taught, so whichever of them the model half-masters gives groups with signal
        (a tiny model's arithmetic may be all wrong while its letter counting is not); groups
        with no signal cost their samples but no gradient. Each item is `TASK` or `TASK:WEIGHT`:
        the weights set the tasks' shares of the prompts (a task without one keeps its
        builtin:chat share), e.g. to favour the tasks the model gets right only sometimes.
    group_size: answers sampled per prompt; advantages are relative to the group.
    prompts_per_step: prompts per rollout batch (all ranks together; a multiple of the ranks).
    max_new_tokens: longest answer, in tokens (the context also ends an answer).
    temperature: sampling temperature of the rollouts (> 0); the policy's log-probabilities are
        those of this same distribution (logits / temperature).
    scale_rewards: divide each advantage (reward - group mean) by the group's standard deviation
        (GRPO); false keeps the plain difference (Dr. GRPO: no bias towards easy / hard prompts).
    format_reward: weight of the format reward added to the task's reward: 1 for an answer that
        ends with `#### N` and then <|end|>, else 0.
    clip_eps: PPO clip range of the importance ratio (matters when epochs_per_batch > 1).
    epochs_per_batch: optimizer steps taken on one batch of rollouts.
    kl_coef: weight of the KL penalty to the reference (the starting model); 0 only logs it.
    reward_model: a reward-model checkpoint (lmforge reward train) scoring the answers instead of
        the tasks' checkers ("" = the checkers).
    eval_examples: held-out (test split) questions of the greedy pass@1 measured every
        train.eval_every steps, shared out over the tasks (256: with 64, ten per task of
        --tasks chat, the noise hid a gain of 12 questions in 1,060 and selected step 0).
    select_best: the run's result is its checkpoint with the highest pass@1 (step 0, the
        starting model, included), named in RUN_DIR/checkpoints/selected.json and loaded for the
        run directory; false: the last checkpoint.
    compile: the rollout and pass@1 Engine's decode step through torch.compile (the Engine's
        `compile`: sampled rows drawn inside the graph, batches up to the rollout's rows). On
        the tiny model on CPU ~1.3x the eager Engine's rollout tokens/s (nothing on a 23M one), but
        each batch size compiles once per run first (benchmarks/RESULTS.md): worth it for long runs, not a few minutes.
    """

    tasks: list[str] = field(default_factory=lambda: ["chat"])
    group_size: int = 8
    prompts_per_step: int = 8
    max_new_tokens: int = 96
    temperature: float = 1.0
    scale_rewards: bool = True
    format_reward: float = 0.0
    clip_eps: float = 0.2
    epochs_per_batch: int = 1
    kl_coef: float = 0.0
    reward_model: str = ""
    eval_examples: int = 256
    select_best: bool = True
    compile: bool = False

    def validate(self) -> None:
        if not self.tasks:
            raise ConfigError("grpo.tasks is empty: name at least one task, or chat")
        if self.group_size < 2:
            raise ConfigError(f"grpo.group_size={self.group_size} must be >= 2: advantages are "
                              "relative to the group")
        for name in ("prompts_per_step", "max_new_tokens", "epochs_per_batch", "eval_examples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"grpo.{name}={getattr(self, name)} must be >= 1")
        if not self.temperature > 0:
            raise ConfigError(f"grpo.temperature={self.temperature} must be > 0: rollouts are sampled")
        for name in ("format_reward", "clip_eps", "kl_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"grpo.{name}={getattr(self, name)} must be >= 0")
