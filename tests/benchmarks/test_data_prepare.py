"""The data-prepare benchmark's parts on a tiny corpus (the real run is `moelab bench data-prepare`)."""
import json

from moelab.data.bench import make_corpus, markdown, run_prepare, run_reference, verdicts
from moelab.data.prepare import prepare_data


def test_corpus_does_not_repeat_and_one_point_runs(tmp_path):
    path = tmp_path / "c.jsonl"
    chars = make_corpus(path, 300_000)
    texts = [json.loads(line)["text"] for line in open(path)]
    assert chars >= 300_000 and sum(map(len, texts)) == chars
    assert len(set(texts)) == len(texts) > 50
    prepare_data(str(path), "bpe:300", out=tmp_path / "tok", workers=1, progress=False)
    tok = tmp_path / "tok" / "tokenizer.json"
    row = {"gb": 0.0003, **run_prepare(path, tok, tmp_path / "out", 1),
           "reference": run_reference(path, tok, 1, 100_000)}
    assert row["chars"] == chars and row["peak_rss"] > 10 * 2**20 and row["tokens"] > 0
    assert row["reference"]["chars"] >= 100_000
    result = {"rows": [row], "workers": 1, "reference_chars": 100_000}
    assert "| 1 |" in markdown(result) and len(verdicts(result)) == 4
