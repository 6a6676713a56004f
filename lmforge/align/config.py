"""The alignment stages' config sections. Torch-free; part of `RunConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.errors import ConfigError


@dataclass
class GrpoConfig:
    """RL with verifiable rewards (`lmforge grpo`, lmforge/align/grpo.py).

    tasks: built-in tasks whose train split gives the prompts and whose checker gives the reward
        (lmforge.tasks.make_tasks: arithmetic, letters, identity, shakespeare, bible, docstrings),
        or "chat" (the default) for every verifiable one, each in its builtin:chat share: the
        tasks SFT taught, so whichever of them the model half-masters gives groups with signal
        (a tiny model's arithmetic may be all wrong while its letter counting is not); groups
        with no signal cost their samples but no gradient.
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
        train.eval_every steps, shared out over the tasks.
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
    eval_examples: int = 64

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
