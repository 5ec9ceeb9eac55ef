"""eval.json: one tolerant reader and one atomic writer shared by every evaluation command."""
import json
import math

import numpy as np
import pytest

from moelab.eval.results import (EVAL_FILE, jsonable, merge_eval_json, read_eval_json,
                                 write_eval_json)


def test_merge_replaces_only_its_own_key(tmp_path):
    merge_eval_json(tmp_path, "tasks", {"cloze": {"acc": 0.5}})
    merge_eval_json(tmp_path, "lm_eval", {"moelab_cloze": {"acc": 0.25}})
    data = merge_eval_json(tmp_path, "tasks", {"minpairs": {"acc": 0.75}})
    assert data == json.loads((tmp_path / EVAL_FILE).read_text())
    assert data["tasks"] == {"cloze": {"acc": 0.5}, "minpairs": {"acc": 0.75}}
    assert data["lm_eval"] == {"moelab_cloze": {"acc": 0.25}}
    assert [p.name for p in tmp_path.iterdir()] == [EVAL_FILE]  # no temporary file left


@pytest.mark.parametrize("text", ['{"val": {"perplexity": 3', "[1, 2]", "\xff\xfe"])
def test_damaged_or_foreign_file_is_rebuilt(tmp_path, text):
    (tmp_path / EVAL_FILE).write_bytes(text.encode("latin-1"))
    assert read_eval_json(tmp_path) == {}
    assert merge_eval_json(tmp_path, "tasks", {"cloze": {"acc": 1.0}}) == \
        {"tasks": {"cloze": {"acc": 1.0}}}


def test_missing_file_reads_empty(tmp_path):
    assert read_eval_json(tmp_path / "nowhere") == {}


def test_written_file_is_plain_json(tmp_path):
    write_eval_json(tmp_path, {"ppl": np.float32(2.5), "n": np.int64(3), "bad": math.inf,
                               "pair": (1, 2)})
    text = (tmp_path / EVAL_FILE).read_text()
    assert json.loads(text) == {"ppl": 2.5, "n": 3, "bad": None, "pair": [1, 2]}
    assert "Infinity" not in text and "NaN" not in text


def test_jsonable_falls_back_to_str():
    assert jsonable({1: object}) == {"1": str(object)}
