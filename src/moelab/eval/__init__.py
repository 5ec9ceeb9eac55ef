"""Evaluation: perplexity, built-in zero-shot tasks, lm-evaluation-harness, run reports.

    from moelab.eval import run_tasks, run_lm_eval, write_report
    run_tasks("runs/x", ["cloze", "minpairs"])          # RUN/eval.json "tasks"
    run_lm_eval("runs/x", ["moelab_cloze"])              # RUN/eval.json "lm_eval" (needs lm-eval)
    write_report("runs/x")                               # RUN/report/report.md (needs matplotlib)

Names are imported lazily, so `import moelab.eval` neither imports torch nor needs the
optional packages of the `eval` extra.
"""
from importlib import import_module

_EXPORTS = {
    "evaluate_run": "perplexity",
    "score_loglikelihood": "zeroshot", "score_rolling": "zeroshot", "run_tasks": "zeroshot",
    "score_multiple_choice": "zeroshot", "score_minimal_pairs": "zeroshot",
    "TASKS": "tasks", "build_task": "tasks", "export_lm_eval_tasks": "tasks",
    "MoelabLM": "harness", "run_lm_eval": "harness",
    "write_report": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"moelab.eval.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'moelab.eval' has no attribute {name!r}")
