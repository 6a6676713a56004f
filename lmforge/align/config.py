"""The alignment config sections (torch-free; part of `RunConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.errors import ConfigError

DPO_LOSSES = ("sigmoid", "ipo", "sigmoid_norm")


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
    val_fraction: share of a file's pairs held out (by content hash) for the held-out metrics.
    prefs_prompts / prefs_val_prompts: builtin:prefs prompts drawn from the train / test split.
    prefs_samples: answers sampled per prompt (at prefs_temperature, at most prefs_max_tokens).
    prefs_greedy: also the greedy answer (temperature 0), paired first: its mistakes are the
        model's most likely ones.
    prefs_pairs: at most this many (right, wrong) pairs per prompt.
    """

    data: list[str] = field(default_factory=lambda: ["builtin:prefs"])
    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    val_fraction: float = 0.05
    prefs_prompts: int = 512
    prefs_val_prompts: int = 64
    prefs_samples: int = 8
    prefs_temperature: float = 1.0
    prefs_max_tokens: int = 128
    prefs_greedy: bool = True
    prefs_pairs: int = 2

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
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"dpo.val_fraction={self.val_fraction} must be in [0, 1)")
        for name in ("prefs_prompts", "prefs_samples", "prefs_max_tokens", "prefs_pairs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"dpo.{name}={getattr(self, name)} must be >= 1")
        if self.prefs_samples < 2:
            raise ConfigError(f"dpo.prefs_samples={self.prefs_samples} must be >= 2 to find a right "
                              "and a wrong answer")
        if self.prefs_val_prompts < 0:
            raise ConfigError(f"dpo.prefs_val_prompts={self.prefs_val_prompts} must be >= 0")
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
