"""The built-in task generators: deterministic, the documented sizes, well-formed items."""
import collections

import pytest
import yaml

from moelab.errors import ConfigError
from moelab.eval.tasks import TASKS, build_task, check_task_names, cloze, export_lm_eval_tasks
from moelab.eval.tasks import minpairs


def test_cloze_items():
    from moelab.data.corpus import TEST_TITLES, load_default_corpus

    items = build_task("cloze")
    assert items == cloze.build()  # a fresh build gives the very same items
    assert len(items) == 265
    counts = collections.Counter(it["source"] for it in items)
    assert counts == {"persuasion": 120, "twelfth night": 120, "sonnets": 25}
    texts = {d["title"]: d["text"] for d in load_default_corpus() if d["title"] in TEST_TITLES}
    for it in items:
        assert len(it["choices"]) == 4 and 0 <= it["label"] < 4
        assert len({c.lower() for c in it["choices"]}) == 4
        assert it["choices"][it["label"]] == it["target"]
        assert it["context"].strip() and it["context"] == it["context"].rstrip()
        # the passage is verbatim held-out text, and the answer is its next word
        assert it["context"] + " " + it["target"] in texts[it["source"]]
        assert it["target"].lower() in it["context"].lower()
        assert cloze.MIN_WORDS <= len(it["context"].split()) <= cloze.MAX_WORDS
        for c in it["choices"]:
            assert c.lower() in it["context"].lower() and len(c) >= 3
    assert len({it["id"] for it in items}) == len(items)
    # labels are spread over the four positions, not always the same one
    assert min(collections.Counter(it["label"] for it in items).values()) > 40


def test_minpairs_items():
    items = build_task("minpairs")
    assert items == minpairs.build()
    assert len(items) == 350
    counts = collections.Counter(it["phenomenon"] for it in items)
    assert counts == {p: minpairs.PER_PHENOMENON for p in minpairs.PHENOMENA}
    # both directions equally often, so always preferring one form scores exactly chance
    features = collections.Counter((it["phenomenon"], it["feature"]) for it in items)
    assert set(features.values()) == {minpairs.PER_PHENOMENON // 2}
    for it in items:
        good, bad = it["good"].split(), it["bad"].split()
        assert len(good) == len(bad) and good != bad
        assert sum(g != b for g, b in zip(good, bad)) == 1  # exactly one word differs
        assert it["good"][0].isupper() and it["good"].endswith(".")
    assert len({(it["good"], it["bad"]) for it in items}) == len(items)


def test_build_task_returns_copies_and_checks_names():
    a = build_task("minpairs")
    a[0]["good"] = "changed"
    assert build_task("minpairs")[0]["good"] != "changed"
    with pytest.raises(ConfigError, match="unknown task 'hellaswag'"):
        check_task_names(["cloze", "hellaswag"])
    with pytest.raises(ConfigError, match="no task"):
        check_task_names([" "])


def test_export_writes_absolute_yaml_and_jsonl(tmp_path):
    import json

    path = export_lm_eval_tasks(tmp_path / "tasks")
    for name in TASKS:
        cfg = yaml.safe_load((tmp_path / "tasks" / f"moelab_{name}.yaml").read_text())
        assert cfg["task"] == f"moelab_{name}" and cfg["dataset_path"] == "json"
        data = cfg["dataset_kwargs"]["data_files"]["test"]
        assert data.startswith("/") and data.startswith(path)
        rows = [json.loads(line) for line in open(data)]
        assert rows == build_task(name)
