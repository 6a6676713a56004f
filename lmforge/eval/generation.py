"""Tasks scored by generation: `gsm8k`, `humaneval`, `mbpp` and `chat`, all through the engine.

Every completion comes from `lmforge.engine.Engine` (the only generator): the prompts of a task
are submitted together and decoded with continuous batching, `batch_size` rows at a time, each
request with its own stop strings, `n` samples sharing one prefill and a seed per item (so a
sample does not depend on which items ran beside it). Greedy (temperature 0) unless asked.

Prompt formats (`EvalOptions.format`, chosen by `lmforge eval --format`, see `model_format`):
- "base": plain-text few-shot prompts (GSM8K: the standard 8 exemplars, or `--shots K`);
- "chat" / "letters": the chat format of lmforge.chat (GSM8K zero-shot by default, exemplars as
  earlier turns with `--shots K`); "letters" also changes the multiple-choice tasks (runner.py).
HumanEval and MBPP are code completion in every format (the prompt is code or a docstring and the
completion continues it), as lm-evaluation-harness' `humaneval`/`mbpp` tasks prompt any model.

A prompt longer than the model's context keeps its end (the question) and loses exemplars from
the front, leaving room for at least half the context of answer; the count of such prompts is
reported as `truncated_prompts`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.errors import UserError

if TYPE_CHECKING:
    from lmforge.engine import Event
    from lmforge.eval.runner import EvalOptions

FORMATS = ("auto", "base", "chat", "letters")
CHAT_ITEMS = 100  # questions per builtin:chat task unless --limit says otherwise
CHAT_BASE_SHOTS = 3  # a base model meets builtin:chat questions few-shot (score_task's plain text)
GSM8K_TOKENS = 512  # the requests' max_gen_toks
CODE_TOKENS = 512
CODE_TEMPERATURE = 0.8  # sampled pass@k when --samples > 1 (the Codex paper's for pass@10 and up)


# ---- which prompt format a checkpoint gets


def model_format(checkpoint: str | Path, tokenizer) -> str:
    """"chat" for a checkpoint that came out of SFT or alignment with a tokenizer holding the chat
    tokens, else "base".

    A fine-tuned checkpoint is recognised by what `lmforge sft` leaves: a LoRA checkpoint
    (lora.json) or a run directory with `base.json` (the base it started from) above it.
    """
    from lmforge.chat import CHAT_TOKENS
    from lmforge.checkpoint import resolve_checkpoint
    from lmforge.finetune.lora import is_lora_checkpoint
    from lmforge.finetune.sft import BASE_RECORD

    if any(t not in tokenizer.special_tokens for t in CHAT_TOKENS):
        return "base"
    directory = resolve_checkpoint(checkpoint)
    fine_tuned = is_lora_checkpoint(directory) or any(
        (d / BASE_RECORD).is_file() for d in (directory, directory.parent, directory.parent.parent))
    return "chat" if fine_tuned else "base"


def resolve_format(requested: str, checkpoint: str | Path, tokenizer) -> str:
    """`--format` -> base, chat or letters ("auto": `model_format`); chat needs the chat tokens."""
    from lmforge.chat import require_chat_tokens

    if requested not in FORMATS:
        raise UserError(f"--format {requested!r}: choose one of {', '.join(FORMATS)}")
    if requested == "auto":
        return model_format(checkpoint, tokenizer)
    if requested != "base":
        require_chat_tokens(tokenizer, f"--format {requested}: the checkpoint's tokenizer")
    return requested


# ---- generation through the engine


def fit_prompt(ids: list[int], context: int, max_new_tokens: int) -> tuple[list[int], bool]:
    """The prompt's last tokens, leaving room for min(max_new_tokens, context / 2) new ones."""
    keep = context - min(max_new_tokens, context // 2)
    return (ids[-keep:], True) if len(ids) > keep else (ids, False)


def generate(model, tokenizer, prompts: Sequence[list[int]], options: EvalOptions, name: str,
             max_tokens: int, stop: Sequence[str] = (), n: int = 1,
             temperature: float = 0.0) -> tuple[list[list[str]], int]:
    """n completions of each prompt (token ids) and the number of prompts cut to fit."""
    from lmforge.engine import Engine, SamplingParams
    from lmforge.eval.runner import progress_bar

    context = model.cfg.max_seq_len
    fitted = [fit_prompt(ids, context, max_tokens) for ids in prompts]
    texts: list[list[list[str]]] = [[[] for _ in range(n)] for _ in prompts]
    was_training = model.training
    engine = Engine(model, tokenizer, max_batch=max(options.batch_size, n))  # puts it in eval mode
    try:
        with progress_bar(len(prompts), name, options.progress) as bar:
            def collect(item: int, event: Event) -> None:  # stepping here, errors raise from step()
                texts[item][event.index].append(event.text)
                if event.finish_reason is not None:
                    bar.update(1 / n)
            for i, (ids, _) in enumerate(fitted):
                # A seed per item: its samples do not depend on the items decoded beside it.
                params = SamplingParams(max_tokens=max_tokens, temperature=temperature, stop=list(stop),
                                        n=n, seed=options.seed + i * n)
                engine.submit(ids, params, on_event=lambda e, i=i: collect(i, e), stream=False)
            while engine.step():
                pass
    finally:
        model.train(was_training)
    return [["".join(parts) for parts in item] for item in texts], sum(cut for _, cut in fitted)


# ---- GSM8K


def gsm8k_prompts(tokenizer, problems: Sequence[Any], shots: int, chat: bool,
                  cache: Path | None = None) -> tuple[list[list[int]], tuple[str, ...]]:
    """Prompt ids of GSM8K problems with `shots` exemplars, and the stop strings of the format."""
    from lmforge.chat import render_prompt
    from lmforge.eval.tasks import gsm8k

    gsm8k.check_shots(shots)
    exemplars = gsm8k.load(cache)[1][:shots]
    if chat:  # the turn ends at <|end|>, which stops every engine request
        return [render_prompt(tokenizer, gsm8k.chat_messages(p, exemplars)) for p in problems], ()
    return [tokenizer.encode(gsm8k.base_prompt(p, exemplars)) for p in problems], gsm8k.STOP


def run_gsm8k(model, tokenizer, options: EvalOptions) -> dict[str, Any]:
    """Exact-match accuracy of the extracted final number (greedy)."""
    from lmforge.eval.runner import mean_stderr
    from lmforge.eval.tasks import gsm8k
    from lmforge.tasks.common import final_number

    start = time.perf_counter()
    problems = gsm8k.load(options.cache)[0]
    problems = problems[:options.limit] if options.limit else problems
    chat = options.format != "base"
    shots = options.shots if options.shots is not None else (0 if chat else gsm8k.STANDARD_SHOTS)
    prompts, stop = gsm8k_prompts(tokenizer, problems, shots, chat, options.cache)
    max_tokens = options.max_new_tokens or GSM8K_TOKENS
    outputs, cut = generate(model, tokenizer, prompts, options, "gsm8k", max_tokens, stop)
    records = []
    for problem, (text,) in zip(problems, outputs, strict=True):
        extracted = final_number(text)
        records.append({"gold": problem.answer, "extracted": extracted, "completion": text,
                        "acc": float(extracted == problem.answer)})
    acc = [r["acc"] for r in records]
    metrics: dict[str, Any] = {"acc": sum(acc) / len(acc), "stderr": mean_stderr(acc),
                               "items": len(records), "shots": shots, "format": "chat" if chat else "base",
                               "truncated_prompts": cut, "seconds": time.perf_counter() - start}
    if options.records:
        metrics["records"] = records
    return metrics


# ---- HumanEval and MBPP


def pass_ks(samples: int) -> list[int]:
    """The k of pass@k reported for n samples: 1, 10, 100 up to n, and n itself."""
    return sorted({1, samples, *(k for k in (10, 100) if k <= samples)})


def run_code(model, tokenizer, options: EvalOptions, name: str) -> dict[str, Any]:
    """pass@1 (greedy, one sample) or pass@k (`samples` at `temperature`), executed in the sandbox."""
    from lmforge.eval import code

    start = time.perf_counter()
    tasks = code.humaneval_tasks(options.cache) if name == "humaneval" else code.mbpp_tasks(options.cache)
    tasks = tasks[:options.limit] if options.limit else tasks
    n = options.samples
    temperature = options.temperature if options.temperature is not None else (CODE_TEMPERATURE if n > 1 else 0.0)
    check_options(name, options)
    # Every task of a benchmark has the same stop strings; the union is safe either way.
    stop = sorted({s for t in tasks for s in t.stop})
    prompts = [tokenizer.encode(t.prompt) for t in tasks]
    outputs, cut = generate(model, tokenizer, prompts, options, name,
                            options.max_new_tokens or CODE_TOKENS, stop, n, temperature)
    ks = pass_ks(n)
    scored = code.score_completions(tasks, {t.task_id: out for t, out in zip(tasks, outputs, strict=True)}, ks)
    metrics: dict[str, Any] = {k: v for k, v in scored.metrics.items() if k.startswith("pass@")}
    metrics.update(stderr=scored.metrics["stderr"], items=len(tasks), shots=0, samples=n,
                   temperature=temperature, truncated_prompts=cut, seconds=time.perf_counter() - start)
    if options.records:
        metrics["records"] = [{**r, "completions": out} for r, out in zip(scored.records, outputs, strict=True)]
    return metrics


# ---- builtin:chat


def chat_tasks() -> dict[str, Any]:
    """The verifiable tasks of builtin:chat (chit-chat has no right answer to check)."""
    from lmforge.tasks import make_tasks

    return {name: task for name, task in make_tasks().items() if task.verifiable}


def run_chat(model, tokenizer, options: EvalOptions) -> dict[str, Any]:
    """Accuracy per builtin:chat task (its held-out questions, `lmforge.tasks.score.score_task`)
    and their mean."""
    from lmforge.eval.runner import mean_stderr
    from lmforge.tasks.score import score_task

    start = time.perf_counter()
    chat = options.format != "base"
    shots = options.shots if options.shots is not None else (0 if chat else CHAT_BASE_SHOTS)
    check_options("chat", options)
    per_task: dict[str, float] = {}
    outcomes: list[float] = []
    records = []
    for name, task in chat_tasks().items():
        score = score_task(model, tokenizer, task, n=options.limit or CHAT_ITEMS, seed=options.seed,
                           few_shot=0 if chat else shots, max_new_tokens=options.max_new_tokens or 64)
        per_task[name] = score.accuracy
        outcomes += [1.0] * score.correct + [0.0] * (score.total - score.correct)
        records += [{"task": name, "question": e.prompt[-1]["content"], "gold": e.answer, "answer": a}
                    for e, a in score.answers]
    if not per_task:
        raise UserError("builtin:chat has no verifiable tasks to evaluate")
    metrics: dict[str, Any] = {"acc": sum(per_task.values()) / len(per_task), "stderr": mean_stderr(outcomes),
                               "tasks": per_task, "items": len(outcomes), "shots": 0 if chat else shots,
                               "format": "chat" if chat else "base", "seconds": time.perf_counter() - start}
    if options.records:
        metrics["records"] = records
    return metrics


def check_options(name: str, options: EvalOptions) -> None:
    """Refuse, before any task runs, options a generation task would refuse hours later."""
    from lmforge.eval.tasks import gsm8k

    chat = options.format != "base"
    if name == "gsm8k" and options.shots is not None:
        gsm8k.check_shots(options.shots)
    if name == "chat" and not chat and options.shots == 0:
        raise UserError("task chat with --format base needs --shots >= 1 (a base model is asked "
                        "few-shot in plain text); or use --format chat")
    if name in ("humaneval", "mbpp") and options.samples > 1 and options.temperature == 0:
        raise UserError(f"--samples {options.samples} at temperature 0 gives {options.samples} copies "
                        "of the greedy answer; set --temperature above 0 (e.g. 0.8)")


RUNNERS = {
    "gsm8k": run_gsm8k,
    "humaneval": lambda model, tokenizer, options: run_code(model, tokenizer, options, "humaneval"),
    "mbpp": lambda model, tokenizer, options: run_code(model, tokenizer, options, "mbpp"),
    "chat": run_chat,
}

__all__ = ["FORMATS", "RUNNERS", "check_options", "fit_prompt", "generate", "gsm8k_prompts",
           "model_format", "pass_ks", "resolve_format", "run_chat", "run_code", "run_gsm8k"]
