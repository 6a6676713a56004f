"""The `run` section: what `lmforge run` does after pre-training, and how it splits its time budget.

Torch-free; part of `RunConfig` (lmforge/config.py), so `--set run.align=none` works like any field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.errors import ConfigError

ALIGN_CHOICES = ("dpo", "grpo", "none")
EXPORT_CHOICES = ("hf", "gguf")


@dataclass
class LifecycleConfig:
    """The lifecycle of `lmforge run`: pre-training, then SFT, alignment, evaluation, chat
    transcripts, export and the report (see docs/guide/run.md).

    align: "dpo" (DPO on builtin:prefs, pairs sampled from the SFT model and marked by the
        verifiers), "grpo" (RL on the verifiable builtin:chat tasks) or "none" (the SFT model is
        the final one). DPO is the default: a step is one forward/backward of a chosen/rejected
        pair against cached reference log-probabilities, while GRPO samples a group of answers per
        prompt every step, several times the CPU cost for the same minutes (docs/guide/run.md).
    export: formats written to RUN/export/ from the final model: "hf" (a transformers
        directory) and "gguf" (llama.cpp, f16).
    eval_tasks: `lmforge eval` task names or groups, run on the base, SFT and aligned models, in
        this order, task by task: those not started when the budget's end (less the later
        stages) is reached are skipped and listed (chat first: the numbers the stage is for).
    eval_limit: items per task (the first N; 0 means all): sized so that three models fit the
        eval stage's minutes on two CPU cores. All items are tens of thousands (hours on a CPU,
        far beyond the time the budget keeps for evaluation until it has measured it once).
    chat_tasks / chat_questions: builtin:chat tasks whose held-out questions the final model
        answers for the transcripts (RUN/logs/chat.json), and how many per task.
    pretrain_share / sft_share / align_share: how the time left after the data stages, minus the
        measured (or estimated) cost of the stages that are not trained, is split among the
        training stages of the run; a stage that ends early leaves its time to the ones after it
        in the same invocation, while one finished by an earlier invocation counts as having taken
        its share (a stage redone alone gets its share, not the whole budget).
    min_stage_s: the least time any training stage gets (a too small --time-budget is refused).
    sft_overrides / align_overrides: `section.field=value` items applied to the SFT / alignment
        stage's config only (e.g. "train.lr=1e-3"), on top of that stage's own defaults.
    sft_text: the run's own pre-training shards mixed into the SFT stage's data at this weight
        (`text:RUN/data:W`, lmforge/finetune/data.py): next-token prediction on plain text beside
        the chat turns, so that fine-tuning does not erase the language the model read; 0: chat only.
    """

    align: str = "dpo"
    export: list[str] = field(default_factory=lambda: list(EXPORT_CHOICES))
    eval_tasks: list[str] = field(default_factory=lambda: ["chat", "bpb", "core"])
    eval_limit: int = 100
    chat_tasks: list[str] = field(default_factory=lambda: ["arithmetic", "letters", "shakespeare", "bible"])
    chat_questions: int = 3
    pretrain_share: float = 0.45
    sft_share: float = 0.40
    align_share: float = 0.15
    min_stage_s: float = 30.0
    sft_overrides: list[str] = field(default_factory=list)
    sft_text: float = 0.03
    # builtin:prefs samples 9 answers to each prompt before DPO trains: 256 prompts keep that under
    # a minute on two cores (the `lmforge dpo` default is 512) and give about 270 pairs; 100 steps
    # are about three passes over them (a budget lengthens DPO to at most dpo.max_epochs = 3).
    # From the spread-letters SFT model that selected step 75 at +10 +- 6.3 held-out questions,
    # 128 prompts and 60 steps +3 +- 5.2 (benchmarks/RESULTS.md, 2026-11-30).
    align_overrides: list[str] = field(default_factory=lambda: ["dpo.prefs_prompts=256", "train.max_steps=100"])

    def share(self, stage: str) -> float:
        return {"pretrain": self.pretrain_share, "sft": self.sft_share, "align": self.align_share}[stage]

    def validate(self) -> None:
        if self.align not in ALIGN_CHOICES:
            raise ConfigError(f"run.align={self.align!r} must be one of {', '.join(ALIGN_CHOICES)}")
        unknown = [f for f in self.export if f not in EXPORT_CHOICES]
        if unknown:
            raise ConfigError(f"run.export: unknown format {unknown[0]!r}; choose among "
                              f"{', '.join(EXPORT_CHOICES)}")
        if self.eval_limit < 0:
            raise ConfigError(f"run.eval_limit={self.eval_limit} must be >= 0 (0: every item)")
        if self.chat_questions < 0:
            raise ConfigError(f"run.chat_questions={self.chat_questions} must be >= 0")
        for name in ("pretrain_share", "sft_share", "align_share"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"run.{name}={getattr(self, name)} must be positive")
        if not self.sft_text >= 0:
            raise ConfigError(f"run.sft_text={self.sft_text} must be >= 0 (0: no pre-training text in SFT)")
        if self.min_stage_s <= 0:
            raise ConfigError(f"run.min_stage_s={self.min_stage_s} must be positive")
        for name in ("sft_overrides", "align_overrides"):
            for item in getattr(self, name):
                if "=" not in item or "." not in item.split("=", 1)[0]:
                    raise ConfigError(f"run.{name}: {item!r} is not section.field=value")
