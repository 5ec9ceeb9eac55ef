"""Where training numbers go: RUN_DIR/metrics.jsonl, TensorBoard (RUN_DIR/tb) and a tqdm bar.

metrics.jsonl has one JSON object per line. Training lines carry `loss`; validation lines carry
`val_loss` (they are separate lines because validation also runs at step 0, before any update).
On resume, lines beyond the resumed step are dropped and TensorBoard purges the same steps, so
both show one continuous curve rather than the abandoned tail plus its replay.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every complete line of a run's metrics.jsonl (a torn last line is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return out


class MetricsLogger:
    """Appends records to metrics.jsonl and mirrors their scalars to TensorBoard.

    `resume_step=None` starts a fresh log (an earlier attempt that never checkpointed is
    discarded); otherwise records with step > resume_step are removed first.
    """

    def __init__(self, run_dir: str | Path, resume_step: int | None, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        if resume_step is None:
            shutil.rmtree(self.run_dir / TB_DIR, ignore_errors=True)
            kept: list[dict] = []
        else:
            kept = [r for r in read_metrics(self.run_dir) if r.get("step", 0) <= resume_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)  # rewrite atomically: a crash here keeps the old log
        self.file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency, but a broken install should
                print("moelab: tensorboard not importable; not writing RUN_DIR/tb",  # not stop
                      file=sys.stderr)  # training
            else:
                purge = None if resume_step is None else resume_step + 1
                self.tb = SummaryWriter(str(self.run_dir / TB_DIR), purge_step=purge)

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is None:
            return
        step = record["step"]
        section = "val" if "val_loss" in record else "train"
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                tag = "loss" if key == "val_loss" else key
                self.tb.add_scalar(f"{section}/{tag}", value, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class PendingLogger:
    """Holds the first records of a session in memory until the run is known to start (its
    first optimizer step succeeded); `replay(logger)` then writes them. A command that fails
    before that point has written nothing into the run directory."""

    def __init__(self):
        self.records: list[dict] = []

    def log(self, record: dict) -> None:
        self.records.append(record)

    def replay(self, logger) -> None:
        for record in self.records:
            logger.log(record)
        self.records = []

    def close(self) -> None:
        pass


class NullLogger:
    """What ranks other than 0 log to under torchrun: nothing (rank 0 writes the run's files)."""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class Progress:
    """tqdm bar over optimizer steps showing loss, lr, smoothed tokens/s and (tqdm's) ETA."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                        desc=desc, dynamic_ncols=True, file=sys.stderr)
        self.tok_s = None  # exponential moving average: single steps are noisy
        self.val = None
        self.last = time.perf_counter()

    def update(self, n: int, loss: float, lr: float, tokens_per_s: float) -> None:
        self.tok_s = tokens_per_s if self.tok_s is None else 0.9 * self.tok_s + 0.1 * tokens_per_s
        self.bar.update(n)
        now = time.perf_counter()
        if now - self.last > 0.2 or self.bar.n == self.bar.total:  # postfix costs a redraw
            self.last = now
            post = {"loss": f"{loss:.3f}", "lr": f"{lr:.2e}", "tok/s": f"{self.tok_s:,.0f}"}
            if self.val is not None:
                post["val"] = f"{self.val:.3f}"
            self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        self.bar.close()
