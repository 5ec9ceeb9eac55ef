"""Run a comparison study: same data, same token order, same seed, optionally matched MACs.

Each model trains in OUT/NAME (a normal run directory); once trained and evaluated its row is
written to OUT/NAME/compare.json, so a re-run skips finished models and resumes an interrupted
one from its newest checkpoint.
"""
from __future__ import annotations

import csv
import json
import math
import multiprocessing
import re
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from moelab.compare.matching import macs_per_token, match_macs
from moelab.compare.summary import (CONFIG_SUFFIXES, missing_orderings, ordering_table,
                                    seed_table)
from moelab.config import Config, load_preset, model_config_dict, preset_names
from moelab.errors import ConfigError
from moelab.flops import count, human

COLUMNS = ["model", "preset", "seed", "params_total", "params_active", "macs_per_token",
           "tokens", "tokens_per_s", "train_s", "val_loss", "val_ppl", "cloze_acc",
           "cloze_acc_norm", "minpairs_acc", "dead_experts", "load_imbalance", "matched"]


def tiny_presets() -> list[str]:
    return [n for n in preset_names() if n.endswith("-tiny")]


def load_member(spec: str) -> tuple[str, Config]:
    """(name, config) of a study member given as a preset name or as a YAML/JSON config file
    (named by its file stem): a combination no preset has joins a study as a file. A model
    directory (a run, `moelab import hf` output, a transformers directory; moelab.loading) is a
    member that trains on from its weights (named by the directory)."""
    if is_model_member(spec):
        from moelab.loading import read_model_config

        return Path(spec).expanduser().resolve().name, read_model_config(spec)
    if spec.endswith(CONFIG_SUFFIXES):
        path = Path(spec).expanduser()
        return path.stem, Config.load(path)  # ConfigError names a missing or bad file
    return spec, load_preset(spec)


def is_model_member(spec: str) -> bool:
    """Whether a member spec is a model directory (trained on from its weights)."""
    return Path(spec).expanduser().is_dir()


SEED_SUFFIX = re.compile(r"^(?P<spec>.+)@s(?P<seed>\d+)$")


def study_members(specs: list[str], seeds: tuple[int, ...]) -> list[tuple[str, int]]:
    """The study's (member spec, seed) pairs, seed-major (every member at the first seed before
    any at the second). A spec trains at every seed of `seeds`; written `SPEC@sN` it trains at
    seed N only, so a second seed can be given to a study's close pairs alone. A pair given
    twice counts once."""
    wanted: list[tuple[str, int]] = []
    for spec in specs:
        m = SEED_SUFFIX.match(spec)
        if not m and not seeds:
            raise ConfigError(f"compare: {spec} has no seed: --seeds is empty and the member is "
                              f"not written {spec}@sN")
        pairs = [(m["spec"], int(m["seed"]))] if m else [(spec, s) for s in seeds]
        wanted += [p for p in pairs if p not in wanted]
    order = list(dict.fromkeys([*seeds, *(s for _, s in wanted)]))
    return sorted(wanted, key=lambda p: order.index(p[1]))  # stable: spec order within a seed


def _say(msg: str) -> None:
    print(f"[compare] {msg}", flush=True)


def run_compare(presets: list[str], data_dir: str | Path, tokens: int, out_dir: str | Path,
                match_ref: str | None = None, seeds: tuple[int, ...] = (0,),
                sets: tuple[str, ...] = (), tasks: tuple[str, ...] = ("cloze", "minpairs"),
                task_limit: int | None = 200, eval_tokens: int | None = 60_000,
                progress: bool = True, report_only: bool = False, jobs: int = 1,
                device: str = "auto") -> list[dict]:
    """Train and evaluate every (preset, seed) not finished yet, then write the study's table,
    CSV and curves over all of them. With `report_only`, train nothing: the report covers the
    finished members and names the others (a long study can be reported while it accumulates).
    With `jobs` > 1, that many members train at once in worker processes, splitting the CPU
    threads between them; evaluation and each step's serial parts then overlap (docs/compare.md
    gives the measured gain)."""
    import torch
    from tqdm.auto import tqdm

    from moelab.train.loop import resolve_device
    from moelab.train.metrics import read_metrics

    if not presets:
        raise ConfigError("compare: no presets given (use --presets A,B or --all-tiny)")
    pairs = study_members(presets, seeds)
    # each spec loaded once (it may train at several seeds); every bad member fails up front
    bases = {spec: load_member(spec) for spec in dict.fromkeys(spec for spec, _ in pairs)}
    names = [name for name, _ in bases.values()]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"compare: two members would be named {', '.join(twice)}; rename the "
                          "config file(s) so that every member has its own name")
    if jobs < 1:
        raise ConfigError(f"compare: jobs={jobs}: expected a positive number of members at once")
    device = str(resolve_device(device))  # a bad --device fails before anything trains
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ref_macs = None
    if match_ref:
        ref_cfg = load_member(match_ref)[1].with_overrides(list(sets))
        ref_macs = macs_per_token(ref_cfg.model, ref_cfg.train.seq_len)
        _say(f"matching forward MACs/token to {match_ref}: {human(ref_macs)}")
    # Seed-major: an interrupted multi-seed study has every model at the first seed before any
    # model at the second.
    rows, missing, todo = {}, [], []
    for preset, seed in pairs:
        base, base_cfg = bases[preset]
        name = member_name(base, seed)
        cfg = base_cfg.with_overrides([*sets, f"train.seed={seed}"])
        matched = ""
        if is_model_member(preset):  # its sizes are its weights': never MAC-matched
            matched = "pretrained weights (size not matched)" if ref_macs is not None else ""
        elif ref_macs is not None:
            res = match_macs(cfg, ref_macs)
            cfg, matched = res.config, res.describe()
            _say(matched)
        steps = max(1, math.ceil(tokens / (cfg.train.batch_size * cfg.train.seq_len)))
        key = {"steps": steps, "config": cfg.to_dict()["model"], "seed": seed,
               "data": data_identity(data_dir)}
        if is_model_member(preset):
            key["init_from"] = str(Path(preset).expanduser().resolve())
        done = out / name / "compare.json"
        saved = json.loads(done.read_text()) if done.is_file() else {}
        if _same_key(saved.get("key"), key):
            _say(f"{name}: finished earlier, skipping")
            rows[name] = saved["row"]
        elif report_only:
            started = (out / name / "metrics.jsonl").is_file()
            _say(f"{name}: {'not finished' if started else 'not started'}, left out of the report")
            missing.append(name if started else f"{name} (not started)")
        else:
            check_not_stretched(out / name, steps, cfg)
            todo.append(Member(name, preset, seed, cfg, matched, key, steps))
            rows[name] = None  # keeps the study's order
    bar = tqdm(total=len(todo), desc="compare", unit="model", disable=not progress, position=0)
    member_args = (data_dir, out, tasks, task_limit, eval_tokens, device)
    if jobs == 1 or len(todo) < 2:
        for m in todo:
            bar.set_postfix_str(m.name)
            rows[m.name] = train_member(m, *member_args, progress=progress)
            bar.update(1)
    else:
        threads = max(1, torch.get_num_threads() // jobs)
        _say(f"training {min(jobs, len(todo))} members at once, {threads} thread(s) each")
        ctx = multiprocessing.get_context("spawn")  # no forked OpenMP/torch state in workers
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_threads,
                                 initargs=(threads,)) as pool:
            futures = {pool.submit(train_member, m, *member_args, progress=False): m
                       for m in todo}
            try:
                for f in as_completed(futures):
                    rows[futures[f].name] = f.result()
                    bar.set_postfix_str(futures[f].name)
                    bar.update(1)
            except BaseException:
                # a failed member stops the study: members not started are dropped, running
                # ones finish (their checkpoints and compare.json stay valid for a re-run)
                for f in futures:
                    f.cancel()
                raise
    bar.close()
    rows = [r for r in rows.values() if r is not None]
    if not rows:
        raise ConfigError(f"compare --report-only: no finished member in {out} for these presets, "
                          "seeds, token count, data and overrides")
    metrics = {r["model"]: read_metrics(out / r["model"]) for r in rows}
    for r in rows:  # from the metrics, so resumed and older members are timed the same way
        r.update(run_timing(metrics[r["model"]], r["tokens"], r["tokens_per_s"]))
    write_results(rows, out, missing=missing)
    plot_curves(out, metrics)
    return rows


def run_timing(recs: list[dict], tokens: int, tokens_per_s: float | None) -> dict:
    """train_s (training-step time summed over every session of the run) and the whole run's
    tokens/s, from its metrics lines (a resumed run's last session alone would say less)."""
    train_s = max(training_clock(recs).values()) if recs else None
    return {"train_s": train_s, "tokens_per_s": tokens / train_s if train_s else tokens_per_s}


def check_not_stretched(run_dir: Path, steps: int, cfg) -> None:
    """A member's run that started with another total length is not continued: resuming it
    with this study's --tokens would stretch its learning-rate schedule midway, and the table
    would show a model trained differently from its peers. ConfigError naming both lengths."""
    from moelab.train.checkpoint import STATE_FILE, latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return
    try:
        was = json.loads((ckpt / STATE_FILE).read_text())["total_steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # unreadable: train()'s resume reports the damaged checkpoint itself
    if was != steps:
        per_step = cfg.train.batch_size * cfg.train.seq_len
        raise ConfigError(
            f"compare: member {run_dir.name} in {run_dir} was trained for {was} steps "
            f"({was * per_step:,} tokens); this study asks for {steps} steps "
            f"({steps * per_step:,} tokens). Continuing it would stretch its learning-rate "
            "schedule, so it would not be the model this study describes: use a new --out, "
            f"or remove {run_dir} to train it again at the new length")


def _same_key(stored, key: dict) -> bool:
    """Whether a finished member's key is this member's. Its model config is read through the
    current ModelConfig first, so a config field added to moelab since (at its default) does not
    make finished members look unfinished."""
    if not isinstance(stored, dict) or not isinstance(stored.get("config"), dict):
        return False
    try:
        config = model_config_dict(stored["config"])
    except ConfigError:
        return False
    return {**stored, "config": config} == key


@dataclass(frozen=True)
class Member:
    """One (preset, seed) of a study, configured (and MAC-matched) but not yet trained."""
    name: str
    preset: str
    seed: int
    cfg: Config
    matched: str
    key: dict
    steps: int


def train_member(m: Member, data_dir, out: Path, tasks, task_limit, eval_tokens, device: str,
                 progress: bool) -> dict:
    """Train (or resume) one member, evaluate it and write its compare.json; returns its row.
    Runs in the caller's process or in a worker, so it takes and returns only plain data."""
    from moelab.train.checkpoint import list_checkpoints
    from moelab.train.loop import train
    from moelab.fsutil import write_json_atomic

    run_dir = out / m.name
    _say(f"{m.name}: {m.steps} steps of {m.cfg.train.batch_size} x {m.cfg.train.seq_len} tokens")
    init = m.preset if is_model_member(m.preset) else None
    summary = train(m.cfg, data_dir=data_dir, out_dir=run_dir, steps=m.steps,
                    resume=bool(list_checkpoints(run_dir)), progress=progress, device=device,
                    init_from=init)
    row = evaluate_member(run_dir, m.cfg, summary, tasks, task_limit, eval_tokens, device)
    row.update(model=m.name, preset=m.preset, seed=m.seed, matched=m.matched)
    write_json_atomic(run_dir / "compare.json", {"key": m.key, "row": row})  # never torn
    _say(f"{m.name}: finished, val ppl {row['val_ppl']:.2f}")
    return row


def _worker_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def member_name(preset: str, seed: int) -> str:
    """Run-directory name of one study member; seed 0 keeps the bare preset name, so studies run
    with different seed lists share their seed-0 members."""
    return preset if seed == 0 else f"{preset}@s{seed}"


def data_identity(data_dir: str | Path) -> dict | str:
    """What a finished member's data is recognised by: the shard checksums in meta.json (so a
    study directory stays valid when the data is prepared again elsewhere), else the path."""
    meta = Path(data_dir) / "meta.json"
    try:
        return {"sha256": json.loads(meta.read_text())["sha256"]}
    except (OSError, ValueError, KeyError):
        return str(Path(data_dir).resolve())


def evaluate_member(run_dir: Path, cfg, summary: dict, tasks, task_limit, eval_tokens,
                    device: str = "cpu") -> dict:
    from moelab.eval.perplexity import evaluate_run
    from moelab.eval.zeroshot import run_tasks
    from moelab.train.metrics import read_metrics

    ev = evaluate_run(run_dir, split="val", device=device, max_tokens=eval_tokens)
    zs = run_tasks(run_dir, list(tasks), limit=task_limit, device=device) if tasks else {}
    c = count(cfg.model, seq_len=cfg.train.seq_len)
    row = {
        "params_total": c["params_total"], "params_active": c["params_active"],
        "macs_per_token": macs_per_token(cfg.model, cfg.train.seq_len), "tokens": summary["tokens"],
        **run_timing(read_metrics(run_dir), summary["tokens"], summary["tokens_per_s"]),
        "val_loss": math.log(ev["perplexity"]), "val_ppl": ev["perplexity"],
        "cloze_acc": zs.get("cloze", {}).get("acc"),
        "cloze_acc_norm": zs.get("cloze", {}).get("acc_norm"),
        "minpairs_acc": zs.get("minpairs", {}).get("acc"),
    }
    row.update(routing_stats(run_dir, device=device))
    return row


def routing_stats(run_dir: Path, n_batches: int = 4, device: str = "cpu") -> dict:
    """Dead experts and load imbalance of the final model on validation batches.

    Loads are averaged over the batches per router; a dead expert received no routed pair in any
    of them; imbalance is max load / mean load (1.0 = perfectly even), averaged over routers.
    """
    import torch

    from moelab.data.loader import TokenLoader
    from moelab.train.checkpoint import load_model
    from moelab.train.rundir import read_run_info

    model, cfg, _ = load_model(run_dir, device=device)
    data_dir = read_run_info(run_dir).get("data_dir") or cfg.data.dir
    loader = TokenLoader(data_dir, "val", 8, cfg.train.seq_len, seed=0)
    loads: dict[str, list] = {}
    model.eval()
    with torch.no_grad():
        for x_BT, _ in loader.eval_batches(n_batches):
            for k, v in model(x_BT.to(device), stats=True).metrics.items():
                if k.endswith(".load"):
                    loads.setdefault(k, []).append(v.float())
    if not loads:
        return {"dead_experts": None, "load_imbalance": None}
    dead, imbalance = 0, []
    for vs in loads.values():
        load = torch.stack(vs).mean(0)
        dead += int((load == 0).sum())
        imbalance.append(float(load.max() / load.mean()))
    return {"dead_experts": dead, "load_imbalance": sum(imbalance) / len(imbalance)}


def _fmt(v, kind: str) -> str:
    if v is None:
        return "–"
    return {"h": human(v), "f2": f"{v:.2f}", "f3": f"{v:.3f}", "i": f"{v:,.0f}"}[kind]


def write_results(rows: list[dict], out: Path, missing: list[str] = ()) -> str:
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = ["| model | params | active | MACs/token (deployed) | tokens | tokens/s | train s | val ppl | "
             "cloze acc | minpairs acc | dead experts | load max/mean |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["val_ppl"]):
        lines.append(
            f"| {r['model']} | {_fmt(r['params_total'], 'h')} | {_fmt(r['params_active'], 'h')} | "
            f"{_fmt(r['macs_per_token'], 'h')} | {_fmt(r['tokens'], 'h')} | "
            f"{_fmt(r['tokens_per_s'], 'i')} | {_fmt(r.get('train_s'), 'i')} | {_fmt(r['val_ppl'], 'f2')} | "
            f"{_fmt(r['cloze_acc'], 'f3')} | {_fmt(r['minpairs_acc'], 'f3')} | "
            f"{_fmt(r['dead_experts'], 'i')} | {_fmt(r['load_imbalance'], 'f2')} |")
    # one line per preset: its seeds are matched alike
    changes = list(dict.fromkeys(r["matched"] for r in rows if r.get("matched")))
    if changes:
        lines += ["", "MAC matching:"] + [f"- {c}" for c in changes]
    seeds = seed_table(rows)
    if seeds:
        lines += ["", "Validation perplexity over seeds:", "", *seeds]
    orderings = ordering_table(rows)
    if orderings:
        lines += ["", "The papers' orderings at this scale (validation perplexity; \"a vs b\" is "
                  "mean(a) / mean(b) - 1):", "", *orderings]
    untested = missing_orderings(rows)
    if untested:
        lines += ["", "Orderings not tested (a model has no finished member): "
                  + ", ".join(untested) + "."]
    if missing:
        lines += ["", "Not finished, so not in this table: " + ", ".join(missing) + "."]
    lines += ["", "MACs/token are forward MACs of the model as deployed (MoLE after conversion to "
              "lookup tables); train s is the time spent in training steps, summed over resumes; dead experts "
              "and load max/mean are measured on validation batches."]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


def training_clock(recs: list[dict]) -> dict[int, float]:
    """Seconds spent in training steps up to each logged step (validation and checkpoints not
    counted). Runs log the running total as `train_wall_s`; for lines written before that field
    existed, each logged step's time stands for every step since the previous logged one (with
    log_every > 1 only every n-th step's time is in the file)."""
    clock, elapsed, prev = {0: 0.0}, 0.0, 0
    for r in recs:
        if "train_wall_s" in r:
            elapsed = r["train_wall_s"]
        elif "step_s" in r:
            elapsed += r["step_s"] * (r["step"] - prev)
        if "step_s" in r:
            prev = r["step"]
        clock[r["step"]] = elapsed
    return clock


def plot_curves(out: Path, metrics: dict[str, list[dict]]) -> None:
    """Validation loss against training tokens and against training time, all models. The y axis
    spans the losses after step 0, so the untrained point sits above the frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_t, ax_t = plt.subplots(figsize=(7, 4.5))
    fig_w, ax_w = plt.subplots(figsize=(7, 4.5))
    trained = []  # losses after step 0: the untrained ~log(vocab) would flatten every curve
    for name, recs in metrics.items():
        clock = training_clock(recs)
        val = [(r["tokens"], clock[r["step"]], r["val_loss"]) for r in recs if "val_loss" in r]
        if not val:
            continue
        tok, wall, loss = zip(*val)
        trained += [v for t, v in zip(tok, loss) if t > 0]
        ax_t.plot([t / 1e6 for t in tok], loss, marker="o", ms=3, label=name)
        ax_w.plot(wall, loss, marker="o", ms=3, label=name)
    for ax, fig, xlabel, fname in ((ax_t, fig_t, "training tokens (millions)", "val_loss_vs_tokens.png"),
                                   (ax_w, fig_w, "training time (s, steps only)", "val_loss_vs_time.png")):
        if trained:
            lo, hi = min(trained), max(trained)
            pad = 0.05 * (hi - lo) or 0.05
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title("Validation loss, same data and token order")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
