"""The shared RESULTS.md section writer: replaces only its own section, appends when missing."""
from moelab.bench_results import cpu_features, cpu_name, load_average, markers, write_section


def test_write_section_replaces_only_its_own(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nintro\n\n<!-- other:start -->\nkeep me\n<!-- other:end -->\n")
    write_section("mine", "## Mine\nv1", path)
    write_section("mine", "## Mine\nv2", path)
    text = path.read_text()
    start, end = markers("mine")
    assert text.count(start) == 1 and text.count(end) == 1
    assert "v2" in text and "v1" not in text
    assert "keep me" in text and text.startswith("# Results\n\nintro")
    # a body already wrapped in the markers is not wrapped twice
    write_section("mine", f"{start}\nv3\n{end}", path)
    assert path.read_text().count(start) == 1 and "v3" in path.read_text()
    assert not list(tmp_path.glob(".*tmp*"))  # the temp file was renamed away


def test_write_section_creates_file(tmp_path):
    path = tmp_path / "sub" / "RESULTS.md"
    write_section("x", "body", path)
    assert path.read_text().startswith("# Benchmark results") and "body" in path.read_text()


def test_machine_facts_are_strings():
    assert cpu_name() and cpu_features() and load_average()


def test_time_ms_times_the_call():
    import time

    from moelab.bench_results import time_ms

    calls = []
    ms = time_ms(lambda: (calls.append(1), time.sleep(0.02)), "cpu")
    assert calls == [1] and 15 <= ms < 1000
