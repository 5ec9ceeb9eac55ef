"""`write_report`: files are written, sections match the model, report.md agrees with
report.json."""
import json
import re

import pytest
from conftest import make_run

from moelab.eval.report import write_report

CELL_NUMBER = re.compile(r"^-?\d+(\.\d+)?(e[-+]\d+)?$")


def md_tables(md: str) -> list[list[list[str]]]:
    """Tables of report.md as lists of rows of cells (header row included)."""
    tables, current = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            if not line.startswith("|---"):
                current.append([c.strip() for c in line.strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


def json_numbers(obj) -> list[float]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in json_numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in json_numbers(v)]
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return [float(obj)]
    return []


def check_md_matches_json(md: str, rep: dict) -> None:
    known = json_numbers(rep)
    for table in md_tables(md):
        for row in table[1:]:
            for cell in row[1:]:  # the first cell labels the row (metric, router, layer)
                if CELL_NUMBER.match(cell):
                    assert any(float(cell) == x for x in known), f"{cell} not in report.json"
    # and the other way round: the headline numbers of the JSON are printed in the tables
    cells = {c for t in md_tables(md) for row in t for c in row}
    for key, value in (rep["training"] or {}).items():
        assert f"{value:.4g}" in cells or str(value) in cells, key
    for value in rep["diagnostics"]["attn_first_token"] + rep["diagnostics"]["max_activation"]:
        assert f"{value:.4g}" in cells


def write_metrics(run_dir, routers: bool) -> None:
    recs = []
    for s in range(1, 31):
        r = {"step": s, "loss": 5.0 - 0.05 * s, "aux_loss": 0.0, "lr": 1e-3, "tokens": 256 * s,
             "tokens_per_s": 1000.0 + s}
        if routers:
            for layer in range(2):
                r[f"layer{layer}.ffn_router.entropy"] = 1.3 - 0.01 * s
                r[f"aux.layer{layer}.ffn_router.entropy"] = 0.5  # a loss, not the metric
        recs.append(r)
        if s % 10 == 0:
            v = {"step": s, "val_loss": 5.2 - 0.05 * s, "tokens": 256 * s}
            if routers:
                v["layer0.ffn_router.load"] = [0.5, 0.25, 0.25, 0.0]
                v["layer1.ffn_router.load"] = [0.1, 0.2, 0.3, 0.4]
            recs.append(v)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_dense_report(tiny_run, tmp_path):
    write_metrics(tiny_run, routers=False)
    md_path = write_report(tiny_run, out_dir=tmp_path / "rep", windows=4)
    out = md_path.parent
    rep = json.loads((out / "report.json").read_text())
    for name in ("loss.png", "diagnostics.png"):
        assert (out / name).stat().st_size > 1000  # a real figure, not an empty canvas
    assert (out / "report.md").stat().st_size > 0 and (out / "report.json").stat().st_size > 0
    assert not (out / "expert_load.png").exists()
    md = md_path.read_text()
    assert rep["routing"] is None and "no routers" in md
    assert rep["training"]["steps"] == 30 and rep["training"]["final_train_loss"] == 3.5
    assert rep["training"]["best_val_loss"] == 3.7
    assert len(rep["diagnostics"]["attn_first_token"]) == 2  # one value per layer
    assert all(0 <= a <= 1 for a in rep["diagnostics"]["attn_first_token"])
    assert rep["heldout"]["tokens"] == 4 * 64 and "bundled corpus" in rep["heldout"]["source"]
    check_md_matches_json(md, rep)


def test_moe_report_has_routing_sections(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    make_run(run, "model.ffn.kind=moe", "model.ffn.n_experts=4", "model.ffn.top_k=1",
             "model.ffn.expert_dim=16")
    write_metrics(run, routers=True)
    md_path = write_report(run, windows=4)
    assert md_path == run / "report" / "report.md"
    rep = json.loads((run / "report" / "report.json").read_text())
    for name in ("loss.png", "expert_load.png", "router_entropy.png", "diagnostics.png"):
        assert (run / "report" / name).stat().st_size > 1000
    held = rep["routing"]["heldout"]
    assert list(held) == ["layer0.ffn_router", "layer1.ffn_router"]
    for r in held.values():
        assert r["n_experts"] == 4 and sum(r["load"]) == pytest.approx(1, abs=1e-3)
        assert r["dead"] == sum(1 for x in r["load"] if x == 0)
    logged = rep["routing"]["logged"]
    assert logged["step"] == 30 and logged["routers"]["layer0.ffn_router"]["dead"] == 1
    assert rep["router_entropy"]["layer0.ffn_router"] == {
        "first_step": 1, "first": 1.29, "last_step": 30, "last": 1.0}
    check_md_matches_json(md_path.read_text(), rep)


def test_heldout_text_comes_from_the_data_dir(tiny_run, tmp_path):
    from moelab.data import prepare_data

    text = tmp_path / "book.txt"
    text.write_text("\n".join(f"Line {i} of a small book about the sea and the captain."
                              for i in range(2000)))
    data = tmp_path / "data"
    prepare_data(str(text), str(tiny_run / "tokenizer.json"), out=data, progress=False)
    md_path = write_report(tiny_run, out_dir=tmp_path / "rep", data_dir=data, windows=2)
    rep = json.loads((md_path.parent / "report.json").read_text())
    assert rep["heldout"]["source"] == f"{data.resolve()} split test"
