"""`moelab demo` (the main job of `make demo`) end to end, shrunk to two models and a few steps."""
import pytest

from moelab.cli import main


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--presets", "dense-tiny,moe-tiny", "--tokens", "4096",
            "--jobs", "2", "--no-progress"]
    assert main(argv) == 0
    log = capsys.readouterr().out
    assert (out / "data" / "meta.json").is_file()  # the bundled corpus, prepared
    table = (out / "compare" / "results.md").read_text()
    assert "| dense-tiny |" in table and "| moe-tiny |" in table and "moe < dense" in table
    assert "[demo] sample from" in log and "[demo] done in" in log
    # run again: both models are found finished, nothing retrains
    assert main(argv) == 0
    assert capsys.readouterr().out.count("finished earlier, skipping") == 2
