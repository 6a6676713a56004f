"""An lm-evaluation-harness model named `lmforge`, so any harness task runs on an lmforge checkpoint.

    pip install "lmforge[eval]"
    python -c "import lmforge.eval.harness; import lm_eval.__main__ as m; m.cli_evaluate()" \\
        --model lmforge --model_args checkpoint=CKPT,batch_size=32 --tasks arc_easy

or from Python: `import lmforge.eval.harness` (registers the model), then
`lm_eval.simple_evaluate(model="lmforge", model_args="checkpoint=CKPT", tasks=[...])`.

Log-likelihoods go through `lmforge.eval.scoring` (the same batched, context-sharing scorer as
`lmforge eval`); rolling log-likelihoods (perplexity tasks) cut the text into the harness' own
disjoint windows first. Generation (`generate_until`) runs on the engine through
`lmforge.eval.generation.generate`, requests with the same stop strings, length and temperature
batched together; a context longer than the model's window keeps its end.
"""

from __future__ import annotations

from typing import Any

from lm_eval import utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from lmforge.eval.scoring import score_requests, text_loglikelihoods

DEFAULT_GEN_TOKENS = 256  # lm-evaluation-harness' default max_gen_toks


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
        return text_loglikelihoods(self.model, self.tokenizer, [req.args for req in requests], self.batch_size)

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
        from lmforge.engine import prompt_ids
        from lmforge.eval.generation import generate
        from lmforge.eval.runner import EvalOptions

        groups: dict[tuple[tuple[str, ...], int, float], list[int]] = {}
        for index, req in enumerate(requests):
            _, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            key = (tuple(until), int(kwargs.get("max_gen_toks", DEFAULT_GEN_TOKENS)), temperature)
            groups.setdefault(key, []).append(index)
        out = [""] * len(requests)
        options = EvalOptions(batch_size=self.batch_size, progress=not disable_tqdm)
        window = self.model.cfg.max_seq_len
        for (until, max_tokens, temperature), indices in groups.items():
            # Whole contexts, cut to fit by `generate` (prompt_ids alone would refuse a long one).
            prompts = [prompt_ids(self.tokenizer, requests[i].args[0], 10**12) for i in indices]
            texts, _ = generate(self.model, self.tokenizer, prompts, options, "generate_until",
                                min(max_tokens, window), until, temperature=temperature)
            for i, (text,) in zip(indices, texts, strict=True):
                out[i] = text
        return out
