"""Where everything of one `lmforge run` lives on disk.

    RUN/config.toml          the resolved config the run was started with
    RUN/stages.json          one record per finished stage: inputs hash, outputs, timings
    RUN/data/                curated documents and token shards (+ manifest.json)
    RUN/tokenizer/           the trained tokenizer
    RUN/checkpoints/         training checkpoints  } pre-training's own run directory layout,
    RUN/metrics.jsonl        training metrics      } so RUN is also a `lmforge pretrain` run
    RUN/tb/                  TensorBoard events    }
    RUN/logs/                samples.json, environment.json, pipeline.log
    RUN/report/              report.md, report.html, report.pdf and the plots they show
    RUN/previous/            outputs of stages redone on changed inputs, STAGE-TIMESTAMP/ each

The report reads any `lmforge pretrain` run directory too: it has the same top level.
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
