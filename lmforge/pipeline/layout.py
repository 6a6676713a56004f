"""Where everything of one `lmforge run` lives on disk.

    RUN/config.toml          the resolved config the run was started with
    RUN/stages.json          one record per finished stage: inputs hash, outputs, timings
    RUN/data/                curated documents and token shards (+ manifest.json)
    RUN/tokenizer/           the trained tokenizer
    RUN/checkpoints/         training checkpoints  } pre-training's own run directory layout,
    RUN/metrics.jsonl        training metrics      } so RUN is also a `lmforge pretrain` run
    RUN/tb/                  TensorBoard events    }
    RUN/sft/                 the SFT run (an `lmforge sft` run directory: checkpoints/, metrics.jsonl)
    RUN/align/               the alignment run (`lmforge dpo` / `lmforge grpo` run directory)
    RUN/eval/results.json    evaluation of the base, SFT and aligned models
    RUN/logs/                samples.json, chat.json, environment.json, pipeline.log
    RUN/export/              hf/ (transformers) and model.gguf (llama.cpp) of the final model
    RUN/report/              report.md, report.html, report.pdf and the plots they show
    RUN/previous/            outputs of stages redone on changed inputs, STAGE-TIMESTAMP/ each

The report reads any `lmforge pretrain` run directory too: it has the same top level.
`--checkpoint RUN` means the run's final model: RUN/align, else RUN/sft, else RUN/checkpoints
(lmforge.checkpoint.resolve_checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def stages(self) -> Path:
        return self.root / "stages.json"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def data_manifest(self) -> Path:
        return self.data / "manifest.json"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def samples(self) -> Path:
        return self.logs / "samples.json"

    @property
    def sft(self) -> Path:
        return self.root / "sft"

    @property
    def align(self) -> Path:
        return self.root / "align"

    @property
    def eval_results(self) -> Path:
        return self.root / "eval" / "results.json"

    @property
    def chat(self) -> Path:
        return self.logs / "chat.json"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def environment(self) -> Path:
        return self.logs / "environment.json"

    @property
    def pipeline_log(self) -> Path:
        return self.logs / "pipeline.log"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def previous(self) -> Path:
        return self.root / "previous"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"
