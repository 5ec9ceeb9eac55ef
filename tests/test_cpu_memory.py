"""moelab.cpu_memory: large freed blocks stay mapped (counted in page faults, not timed)."""
import subprocess
import sys

import pytest

from moelab.config import Config, ConfigError

_FAULTS = """
import resource, sys, torch
if sys.argv[1] == "reuse":
    from moelab.cpu_memory import reuse_large_blocks
    assert reuse_large_blocks()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
# 64 MiB of float32, allocated, written and freed, 8 times. An aligned allocation asks a little
# more than the block freed before it, so reuse starts once freed neighbours have merged
# (after 1-4 rounds here); without the setting every round maps fresh pages.
out = []
for _ in range(8):
    before = faults()
    torch.empty(64 << 18).fill_(1)
    out.append(faults() - before)
print(min(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_reuse_large_blocks_avoids_page_faults_on_the_next_allocation():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True,
                             text=True, check=True)
        return int(out.stdout)

    pages = (64 << 20) // 4096
    assert faults("system") > pages // 2  # every page of each fresh mapping faults in
    assert faults("reuse") < pages // 20  # the freed block comes back without faults


def test_cpu_allocator_choices_are_checked():
    cfg = Config()
    cfg.train.cpu_allocator = "jemalloc"
    with pytest.raises(ConfigError, match=r"train.cpu_allocator.*'jemalloc'"):
        cfg.train.validate()


def test_use_cpu_allocator_system_changes_nothing_and_names_bad_choices():
    from moelab.cpu_memory import use_cpu_allocator

    assert use_cpu_allocator("system") is False
    with pytest.raises(ValueError, match="'jemalloc'.*reuse"):
        use_cpu_allocator("jemalloc")
