"""Multiple-choice scoring speed: `lmforge eval`'s scorer vs lm-evaluation-harness' `hf` model.

Side by side in one run, on the same model (a random `--preset` model with a tokenizer trained on
benchmark text, exported with `lmforge export hf`; or `--checkpoint`) and the same requests: the
first `--limit` items of each task, every (context, choice) pair handed to each model's
`loglikelihood` with the same batch size. Only that call is timed (not data loading). Items/s
counts questions, not choices. Both wall-clock and process CPU time are reported: on a shared
machine the wall clock swings with other load, CPU time (one thread) does not.

    OMP_NUM_THREADS=2 python benchmarks/bench_eval.py --preset tiny --limit 100

Where the benchmark files or lm-eval are missing (a GPU machine with no network): write the
requests here with `--save-requests FILE`, carry FILE, and run there with `--requests FILE
--tokenizer DIR --device cuda`; without lm-eval only our side is timed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch


def make_checkpoint(preset: str, vocab: int, out: Path, tokenizer: Path | None = None) -> Path:
    """A randomly initialised `preset` model with a BPE tokenizer trained on HellaSwag text (or
    the one at `tokenizer`)."""
    from lmforge.checkpoint import save_model
    from lmforge.config import load_config
    from lmforge.eval.data import read_arrow
    from lmforge.model import Transformer
    from lmforge.tokenizer import load_tokenizer, train_tokenizer

    if tokenizer:
        tok = load_tokenizer(tokenizer)
        cfg = load_config(preset=preset, overrides=[f"model.vocab_size={tok.vocab_size}"])
        torch.manual_seed(0)
        return save_model(Transformer(cfg.model), cfg, out / "ckpt", tokenizer_dir=tokenizer)
    docs = read_arrow("hf_datasets/hellaswag/none/validation")[:3000]
    tok = train_tokenizer([d["ctx"] + " " + " ".join(d["endings"]) for d in docs], vocab_size=vocab,
                          progress=False)
    tok.save(out / "tok")
    cfg = load_config(preset=preset, overrides=[f"model.vocab_size={tok.vocab_size}"])
    torch.manual_seed(0)
    return save_model(Transformer(cfg.model), cfg, out / "ckpt", tokenizer_dir=out / "tok")


class ScorerOnly:
    """`lmforge eval`'s scorer behind the one method timed here, for machines without lm-eval
    (whose LM class `LmforgeLM` subclasses)."""

    def __init__(self, checkpoint: Path, batch_size: int, device: str) -> None:
        from lmforge.eval.cli import load_for_eval

        self.model, self.tokenizer = load_for_eval(checkpoint, device)
        self.batch_size = batch_size

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from lmforge.eval.scoring import text_loglikelihoods

        return text_loglikelihoods(self.model, self.tokenizer, [req.args for req in requests], self.batch_size)


def requests_of(task: str, limit: int) -> tuple[int, list[SimpleNamespace]]:
    """(number of items, their requests) for the first `limit` items of `task`."""
    from lmforge.eval.tasks import benchmark

    items, _ = benchmark(task).load(None)
    items = items[:limit]
    return len(items), [SimpleNamespace(args=pair) for item in items for pair in item.requests()]


def timed(lm, requests: list) -> tuple[float, float, list]:
    """(wall seconds, CPU seconds, results) of one `loglikelihood` call."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = lm.loglikelihood(requests, disable_tqdm=True)
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--tasks", default="arc_easy,hellaswag,mmlu")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokenizer", type=Path, help="the random model's tokenizer (default: trained)")
    parser.add_argument("--save-requests", type=Path, help="write the tasks' requests as JSON and stop")
    parser.add_argument("--requests", type=Path, help="read the requests from such a file")
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    if args.save_requests:
        saved = {t: (n, [r.args for r in reqs]) for t in tasks for n, reqs in [requests_of(t, args.limit)]}
        args.save_requests.write_text(json.dumps(saved))
        return
    saved = json.loads(args.requests.read_text()) if args.requests else {}

    from lmforge.interop.hf import export_hf

    try:
        from lm_eval.models.huggingface import HFLM

        from lmforge.eval.harness import LmforgeLM
    except ImportError:
        HFLM, LmforgeLM = None, None
        print("lm-eval is not installed here: timing lmforge alone")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or make_checkpoint(args.preset, args.vocab, Path(tmp), args.tokenizer)
        ours = (LmforgeLM(checkpoint=str(ckpt), batch_size=args.batch_size, device=args.device) if LmforgeLM
                else ScorerOnly(ckpt, args.batch_size, args.device))
        theirs = HFLM and HFLM(pretrained=str(export_hf(ckpt, Path(tmp) / "hf")), dtype="float32",
                               device=args.device, batch_size=args.batch_size)
        print(f"model {ckpt} ({sum(p.numel() for p in ours.model.parameters()) / 1e6:.2f}M params), "
              f"{torch.get_num_threads()} threads, batch {args.batch_size}, {args.device}")
        print(f"{'task':<12} {'items':>6} {'lmforge it/s':>13} {'hf it/s':>9} {'ratio':>6} "
              f"{'CPU-time ratio':>15} {'max |dll|':>10}")
        for task in tasks:
            if task in saved:
                n, requests = saved[task][0], [SimpleNamespace(args=tuple(a)) for a in saved[task][1]]
            else:
                n, requests = requests_of(task, args.limit)
            if not theirs:
                timed(ours, requests[:8])  # warm-up
                t_ours = timed(ours, requests)[0]
                print(f"{task:<12} {n:>6} {n / t_ours:>13.1f}")
                continue
            timed(ours, requests[:8]), timed(theirs, requests[:8])  # warm-up
            t_ours, cpu_ours, ll_ours = timed(ours, requests)
            t_hf, cpu_hf, ll_hf = timed(theirs, requests)
            diff = max(abs(a[0] - b[0]) for a, b in zip(ll_ours, ll_hf, strict=True))
            print(f"{task:<12} {n:>6} {n / t_ours:>13.1f} {n / t_hf:>9.1f} "
                  f"{t_hf / t_ours:>5.2f}x {cpu_hf / cpu_ours:>14.2f}x {diff:>10.2e}")


if __name__ == "__main__":
    main()
