"""An lm-evaluation-harness model named `lmforge`, so any harness task runs on an lmforge checkpoint.

    pip install "lmforge[eval]"
    python -c "import lmforge.eval.harness; import lm_eval.__main__ as m; m.cli_evaluate()" \\
        --model lmforge --model_args checkpoint=CKPT,batch_size=32 --tasks arc_easy

or from Python: `import lmforge.eval.harness` (registers the model), then
`lm_eval.simple_evaluate(model="lmforge", model_args="checkpoint=CKPT", tasks=[...])`.

Log-likelihoods go through `lmforge.eval.scoring` (the same batched, context-sharing scorer as
`lmforge eval`); rolling log-likelihoods (perplexity tasks) cut the text into the harness' own
disjoint windows first. Generation (`generate_until`) is not available yet.
"""

from __future__ import annotations

from typing import Any

from lm_eval import utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from lmforge.eval.scoring import encode_pair, score_requests


@register_model("lmforge")
class LmforgeLM(LM):
    """lm_eval's LM interface over an lmforge checkpoint (its tokenizer included)."""

    def __init__(self, checkpoint: str, batch_size: int | str = 32, device: str = "cpu",
                 **_: Any) -> None:
        from lmforge.eval.cli import load_for_eval

        super().__init__()
        self.model, self.tokenizer = load_for_eval(checkpoint, device)
        # The harness passes "auto" or a string; a fixed batch of contexts is all we need.
        self.batch_size = 32 if batch_size == "auto" else int(batch_size)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tokenizer, *req.args) for req in requests]
        return [(s.logprob, s.greedy) for s in score_requests(self.model, pairs, self.batch_size)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs, owner = [], []
        for index, req in enumerate(requests):
            (text,) = req.args
            windows = utils.get_rolling_token_windows(
                token_list=self.tokenizer.encode(text), prefix_token=self.tokenizer.eot_id,
                max_seq_len=self.model.cfg.max_seq_len, context_len=1)
            for context, continuation in map(utils.make_disjoint_window, windows):
                pairs.append((context, continuation))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, score in zip(owner, score_requests(self.model, pairs, self.batch_size), strict=True):
            totals[index] += score.logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError(
            "the lmforge harness model does not generate yet: run log-likelihood tasks "
            "(multiple choice, perplexity) until the inference engine lands")
