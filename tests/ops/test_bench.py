"""Smoke test of the MoE-layer benchmark (tiny shape, a couple of repeats)."""
import json

from moelab.ops.bench import ALL_BACKENDS, ROW_KEYS, main, results_section, run_benchmark, \
    write_results


def test_run_benchmark_rows():
    rows = run_benchmark(shapes=["tiny"], dtypes=["float32", "bfloat16"], repeats=1,
                         n_tokens=64, threads=None)
    backends = [b for b in ALL_BACKENDS if b != "triton"]
    assert len(rows) == 2 * len(backends)
    for r in rows:
        assert tuple(r) == ROW_KEYS
        assert r["shape"] == "tiny" and r["backend"] in ALL_BACKENDS
        assert r["dense_ms"] > 0 and r["moe_ms"] > 0
        assert abs(r["ratio"] - r["dense_ms"] / r["moe_ms"]) < 0.05 * r["ratio"] + 1e-3


def test_main_json_and_results_file(tmp_path, capsys):
    out = tmp_path / "RESULTS.md"
    out.write_text("# Results\n\nother section\n")
    argv = ["--quick", "--json", "--shapes", "tiny", "--dtypes", "float32", "--backends",
            "scatter", "loop", "--threads", "0", "--write-results", "--results-file", str(out)]
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["backend"] for r in rows] == ["scatter", "loop"]
    text = out.read_text()
    assert "other section" in text and text.count("<!-- moe_layer:start -->") == 1
    assert "| tiny | float32 | scatter |" in text and "torch" in text
    write_results(results_section(rows, "again", 8, 1), out)  # replaces, never duplicates
    text = out.read_text()
    assert text.count("<!-- moe_layer:end -->") == 1 and "`again`" in text
