"""Published zero-shot scores of known small models, shown next to ours in the evaluation table.

For orientation only: the prompts, splits and normalisation of a paper's evaluation differ in
details from ours (lm-evaluation-harness' formats, lmforge/eval/), so read a gap of a few points as
noise. Values are accuracies in [0, 1] on the task's standard evaluation split.

Source: Brown et al., "Language Models are Few-Shot Learners" (GPT-3), 2020, arXiv:2005.14165,
Appendix H, table H.1 ("Scores for every task, setting and model"), column "Small" (125M
parameters), zero-shot. Each score is shown on the row of the metric closest to how the paper
scored the task: HellaSwag by its length-normalised accuracy (acc_norm), the others by accuracy.
"""

from __future__ import annotations

REFERENCES: dict[str, dict[str, object]] = {
    "GPT-3 Small (125M), 0-shot": {
        "params": 125_000_000,
        "source": "Brown et al. 2020, arXiv:2005.14165, table H.1",
        "scores": {"hellaswag": ("acc_norm", 0.337), "piqa": ("acc", 0.646),
                   "arc_easy": ("acc", 0.436), "arc_challenge": ("acc", 0.266),
                   "winogrande": ("acc", 0.520), "boolq": ("acc", 0.497), "lambada": ("acc", 0.427)},
    },
}
