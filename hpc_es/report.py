"""``python -m hpc_es report RUN_DIR [RUN_DIR ...] [--out DIR]``: figures and a summary of runs, from their ledgers.

Only the ledger is read, never weights, so a report is cheap and can be made while a run is going: log.h5
is replaced by a rename after every iteration, so a reader always opens one complete version.  A damaged
log.h5 falls back to the checkpoint's copy (fewer iterations), with a warning.

Figures are PNG files drawn with matplotlib's Agg canvas (no display needed), by default in
``RUN_DIR/report/``: ``reward.png`` (mean reward per iteration, the population's min-max band, and the
test-split reward and accuracy where evaluated), ``time.png`` (seconds per iteration, stacked by phase),
and for several runs ``reward_overlay.png``.  Iterations count from 1 (iteration k = the ledger's row k-1),
as the progress line, the eval messages and the TensorBoard steps do.  Ledger columns that only newer runs
have (eval_kl, eval_accuracy_paper, ...) are drawn and summarised when present, and ignored otherwise.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from hpc_es.errors import ExtraMissing, HpcEsError
from hpc_es.ledger import Ledger, LedgerError

LEDGER = "log.h5"
CHECKPOINT_LEDGER = os.path.join("checkpoint", "log.h5")  # checkpoint.py's copy (importing it pulls in torch)
# (ledger column, legend label) of the phases that Trainer times inside an iteration, in the order they run.
PHASES = (("time_perturb", "perturb"), ("time_rollout", "rollout (generate)"), ("time_reward", "reward"),
          ("time_update", "update"), ("time_eval", "test-split eval"))
TOKENS = "rollout_tokens"  # tokens generated in an iteration (all members), if a ledger records it
WIDTH, HEIGHT, DPI = 8.0, 4.5, 100  # figure size in inches, and pixels per inch: 800 x 450 PNGs


@dataclass
class Run:
    """One run's ledger, as the report uses it."""

    name: str
    run_dir: str
    source: str  # the ledger file that was read
    population: int
    config: dict[str, Any]
    rows: list[dict[str, Any]]

    @property
    def x(self) -> np.ndarray:
        return np.arange(1, len(self.rows) + 1)

    def column(self, key: str) -> np.ndarray:
        """Floats; NaN in rows without the key (a column this run's ledger predates)."""
        return np.array([_float(r.get(key)) for r in self.rows], dtype=np.float64)

    def present(self, prefix: str) -> list[str]:
        """Columns starting with ``prefix`` that hold at least one finite value, sorted."""
        keys = sorted({k for r in self.rows for k in r if k.startswith(prefix)})
        return [k for k in keys if np.isfinite(self.column(k)).any()]


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def load_run(run_dir: str, name: str | None = None) -> tuple[Run, list[str]]:
    """The run in ``run_dir`` and the warnings to print (a fallback to the checkpoint's ledger copy)."""
    name = name or os.path.basename(os.path.normpath(run_dir))
    if not os.path.isdir(run_dir):
        raise LedgerError(f"run directory '{run_dir}' does not exist")
    path, copy = os.path.join(run_dir, LEDGER), os.path.join(run_dir, CHECKPOINT_LEDGER)
    notes: list[str] = []
    try:
        ledger, source = Ledger.load(path), path
    except LedgerError as e:
        first = str(e).replace("\n", " ")
        if not os.path.exists(copy):
            if not os.path.exists(path):
                raise LedgerError(f"'{run_dir}' holds no ledger ({LEDGER}): not a run directory, or its first "
                                  "iteration has not finished yet") from None
            raise LedgerError(f"{first}; there is no checkpoint copy ({CHECKPOINT_LEDGER}) to fall back on") from None
        try:
            ledger, source = Ledger.load(copy), copy
        except LedgerError as e2:
            raise LedgerError(f"{first}; the checkpoint's copy is damaged too ({e2})".replace("\n", " ")) from None
        why = f"{LEDGER} is missing" if not os.path.exists(path) else first
        notes.append(f"{why}; reporting the checkpoint's copy of the ledger instead ({len(ledger)} iterations)")
    try:
        config = ledger.config
    except LedgerError as e:
        config = {}
        notes.append(f"{e}; model and task unknown")
    return Run(name, run_dir, source, ledger.population, config, ledger.rows), notes


# ---- the summary ---------------------------------------------------------------------------------------

def summarise(run: Run) -> dict[str, Any]:
    """The numbers the text summary prints (None where the ledger does not have them)."""
    cfg, n = run.config, len(run.rows)
    mean = run.column("reward_mean")
    out: dict[str, Any] = {
        "name": run.name, "ledger": run.source, "model": cfg.get("model"), "task": cfg.get("task"),
        "population": run.population, "iterations": n, "planned": cfg.get("es", {}).get("iterations"),
        "sigma": run.rows[-1]["sigma"] if n else cfg.get("es", {}).get("sigma"),
        "alpha": run.rows[-1]["alpha"] if n else cfg.get("es", {}).get("alpha"),
        "ranks": _distinct(run.column("world_size")), "slots": _distinct(run.column("slots")),
        "reward_first": None, "reward_last": None, "reward_best": None, "best_iteration": None,
        "eval": {}, "seconds_per_iteration": None, "phases": {}, "tokens_per_s": None,
    }
    if n:
        best = int(np.nanargmax(mean)) if np.isfinite(mean).any() else n - 1
        out.update(reward_first=float(mean[0]), reward_last=float(mean[-1]), reward_best=float(mean[best]),
                   best_iteration=best + 1, seconds_per_iteration=float(np.nanmean(run.column("time_iteration"))))
        for key, label in PHASES:
            if any(key in r for r in run.rows):
                out["phases"][label] = float(np.nanmean(run.column(key)))
        for key in run.present("eval_"):  # the last evaluated value of each test-split column
            col = run.column(key)
            last = int(np.flatnonzero(np.isfinite(col))[-1])
            out["eval"][key.removeprefix("eval_")] = (float(col[last]), last + 1)
        tokens = run.column(TOKENS)
        if np.isfinite(tokens).any():
            seconds = run.column("time_iteration")
            ok = np.isfinite(tokens) & np.isfinite(seconds)
            out["tokens_per_s"] = float(tokens[ok].sum() / seconds[ok].sum())
    return out


def _distinct(col: np.ndarray) -> list[int]:
    """Values in order of first appearance (a run resumed on another rank count has two)."""
    seen: list[int] = []
    for v in col[np.isfinite(col)].astype(int).tolist():
        if v not in seen:
            seen.append(v)
    return seen


def _g(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.6g}"


def format_summary(s: dict[str, Any]) -> str:
    """The summary as aligned text lines (ASCII: it may go to a terminal without UTF-8)."""
    planned = f" of {s['planned']}" if s["planned"] is not None else ""
    ranks = " then ".join(str(r) for r in s["ranks"]) or "n/a"
    slots = " then ".join(str(r) for r in s["slots"]) or "n/a"
    lines = [f"run {s['name']}  ({s['ledger']})",
             f"  model           {s['model'] or 'n/a'}",
             f"  task            {s['task'] or 'n/a'}",
             f"  N, sigma, alpha {s['population']}, {_g(s['sigma'])}, {_g(s['alpha'])}",
             f"  ranks, replicas {ranks}, {slots}",
             f"  iterations      {s['iterations']}{planned}"]
    if s["iterations"]:
        lines.append(f"  mean reward     first {_g(s['reward_first'])}, last {_g(s['reward_last'])}, "
                     f"best {_g(s['reward_best'])} (iteration {s['best_iteration']})")
    ev = s["eval"]
    acc = ev.get("accuracy")
    if acc is not None:
        lines.append(f"  test accuracy   {_g(acc[0])} (after iteration {acc[1]})")
    else:
        why = "this task reports no accuracy" if ev else "no test-split evaluation in the ledger; see eval.every"
        lines.append(f"  test accuracy   n/a ({why})")
    for key, (value, it) in ev.items():
        if key != "accuracy":
            lines.append(f"  test {key:<11}{_g(value)} (after iteration {it})")
    if s["seconds_per_iteration"] is not None:
        phases = ", ".join(f"{k} {_g(v)}" for k, v in s["phases"].items() if v > 0)
        lines.append(f"  s/iteration     {_g(s['seconds_per_iteration'])} mean ({phases})")
    tps = s["tokens_per_s"]
    lines.append(f"  tokens/s        {_g(tps) if tps is not None else f'n/a (the ledger has no {TOKENS} column)'}")
    return "\n".join(lines)


# ---- the figures ---------------------------------------------------------------------------------------

def _figure(height: float = HEIGHT) -> Any:
    """A matplotlib Figure on the Agg canvas (no pyplot state, no display), or the missing-extra error."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ExtraMissing("python -m hpc_es report", "matplotlib") from None
    fig = Figure(figsize=(WIDTH, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself: draws and saves without a GUI backend
    return fig


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _style(ax: Any, many: bool) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.01 if many else 0.05)


def reward_figure(run: Run) -> Any:
    """Mean reward per iteration with the min-max band; test-split reward, accuracy (second axis), KL."""
    kl = run.present("eval_kl")
    fig = _figure(HEIGHT + (1.6 if kl else 0.0))
    if kl:
        ax, ax_kl = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.2])
    else:
        ax, ax_kl = fig.subplots(), None
    x, many = run.x, len(run.rows) > 30
    marker = None if many else "."
    ax.fill_between(x, run.column("reward_min"), run.column("reward_max"), color="C0", alpha=0.2, linewidth=0,
                    label="min-max over the population")
    ax.plot(x, run.column("reward_mean"), color="C0", linewidth=2, marker=marker, label="mean reward (training)")
    ev = run.column("eval_reward")
    done = np.isfinite(ev)
    if done.any():
        ax.plot(x[done], ev[done], "o-", color="C1", label="test-split mean reward")
    handles, labels = ax.get_legend_handles_labels()
    acc = run.present("eval_accuracy")
    if acc:
        ax2 = ax.twinx()
        for i, key in enumerate(acc):
            col = run.column(key)
            ok = np.isfinite(col)
            label = "test-split " + key.removeprefix("eval_").replace("_", " ")
            ax2.plot(x[ok], col[ok], "s--", color=f"C{2 + i}", label=label)
        ax2.set_ylabel("test accuracy (fraction correct)")
        ax2.set_ylim(-0.03, 1.03)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    task = run.config.get("task", "?")
    ax.set_title(f"{_short(run.name)}: {task}, N={run.population}, σ={_g(_last(run, 'sigma'))}, "
                 f"α={_g(_last(run, 'alpha'))}", fontsize=10)
    fig.suptitle("Reward per iteration")
    ax.set_ylabel("reward (task score, mean over prompts)")
    _style(ax, many)
    if ax_kl is not None:
        for i, key in enumerate(kl):
            col = run.column(key)
            ok = np.isfinite(col)
            label = "test-split " + key.removeprefix("eval_").replace("kl", "KL").replace("_", " ")
            ax_kl.plot(x[ok], col[ok], "d-", color=f"C{4 + i}", label=label)
        ax_kl.set_ylabel("KL to base (nats)")
        _style(ax_kl, many)
        h3, l3 = ax_kl.get_legend_handles_labels()
        handles, labels = handles + h3, labels + l3
        ax_kl.set_xlabel("iteration")
    else:
        ax.set_xlabel("iteration")
    fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(handles)), fontsize=9, frameon=False)
    return fig


def _last(run: Run, key: str) -> float | None:
    return float(run.rows[-1][key]) if run.rows and key in run.rows[-1] else None


def time_figure(run: Run) -> Any:
    """Seconds per iteration stacked by phase; "other" is the rest of the wall time (all-reduce, ledger...)."""
    fig = _figure()
    ax = fig.subplots()
    x, many = run.x, len(run.rows) > 30
    width = 1.0 if len(x) > 100 else 0.8
    bottom = np.zeros(len(x))
    for i, (key, label) in enumerate(PHASES):
        col = np.nan_to_num(run.column(key))
        if col.sum() <= 0:
            continue  # a phase this run never spent time in (eval without eval.every)
        ax.bar(x, col, width, bottom=bottom, color=f"C{i}", label=label, linewidth=0)
        bottom += col
    total = run.column("time_iteration")
    other = np.clip(np.nan_to_num(total) - bottom, 0.0, None)
    if other.sum() > 0:
        ax.bar(x, other, width, bottom=bottom, color="0.75", label="other (all-reduce, ledger, ...)", linewidth=0)
    ax.set_title(f"{_short(run.name)}: mean {float(np.nanmean(total)):.3g} s per iteration", fontsize=10)
    return _finish(fig, ax, "Time per iteration by phase (rank 0)", "seconds", many)


def overlay_figure(runs: list[Run]) -> Any:
    """The mean-reward curves of several runs, one colour and legend entry each."""
    fig = _figure()
    ax = fig.subplots()
    many = max(len(r.rows) for r in runs) > 30
    for i, run in enumerate(runs):
        ax.plot(run.x, run.column("reward_mean"), color=f"C{i % 10}", linewidth=2,
                marker=None if many else ".", label=_short(run.name))
    return _finish(fig, ax, "Mean reward per iteration", "mean reward (training prompts)", many)


def _finish(fig: Any, ax: Any, title: str, ylabel: str, many: bool) -> Any:
    """Title, axis labels and the legend below the plot area (outside it, so no curve is ever hidden)."""
    fig.suptitle(title)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    _style(ax, many)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(handles)), fontsize=9, frameon=False)
    return fig


def save(fig: Any, path: str) -> str:
    """Write a PNG under a temporary name, then rename: a viewer never opens half a file."""
    folder = os.path.dirname(path) or "."
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise HpcEsError(f"cannot write the figure '{path}': '{folder}' is a file, not a folder (give --out a folder)")
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}.png"
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)
    except OSError as e:
        raise HpcEsError(f"cannot write the figure '{path}': {e.strerror or e}") from None
    return path


# ---- runs against each other: reward vs KL (the paper's Figure 1 and Table 2) ---------------------------

_NOT_A_SETTING = ("seed", "run_dir", "progress", "threads", "device")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def _final(run: Run, key: str) -> float:
    """The last finite value of a test-split column (the final evaluation), NaN when there is none."""
    col = run.column(key)
    ok = np.isfinite(col)
    return float(col[ok][-1]) if ok.any() else math.nan


@dataclass
class Setting:
    """The runs of one setting (all config keys alike but the seed): their final test-split numbers."""

    label: str
    runs: list[Run]

    def values(self, key: str) -> np.ndarray:
        return np.array([_final(r, key) for r in self.runs])


def settings(runs: list[Run]) -> list[Setting]:
    """Runs grouped by setting, in order of first appearance, labelled by the keys in which settings differ."""
    flats = [{k: v for k, v in _flat(r.config).items() if k.split(".")[0] not in _NOT_A_SETTING
              and not k.startswith(("dist.", "checkpoint.", "log."))} for r in runs]
    keys = sorted({k for f in flats for k in f if len({repr(x.get(k)) for x in flats}) > 1})

    def text(v: Any) -> str:
        return _g(v) if isinstance(v, float) else str(v)

    groups: dict[str, Setting] = {}
    for run, flat in zip(runs, flats):
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={text(flat.get(k))}" for k in keys) or "all runs"
        groups.setdefault(label, Setting(label, [])).runs.append(run)
    return list(groups.values())


def _mean_std(x: np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for one run) over the finite values."""
    x = x[np.isfinite(x)]
    if not len(x):
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0


PARETO_KL = ("eval_kl_k3_per_completion", "eval_kl_per_completion")  # the paper's estimator first


def pareto_table(groups: list[Setting]) -> str:
    """Table 2's columns: per setting, the final test-split reward and KL to the base model, mean ± std over seeds."""
    head = f"{'setting':<32} {'runs':>4}  {'reward':>18}  {'KL k3 / completion':>20}  {'KL exact / completion':>22}"
    lines = [head]
    for g in groups:
        cells = []
        for key in ("eval_reward", *PARETO_KL):
            m, sd = _mean_std(g.values(key))
            cells.append("n/a" if math.isnan(m) else f"{m:.4g} ± {sd:.2g}")
        seeds = f"{len(g.runs)} seed{'s' if len(g.runs) != 1 else ''}"
        lines.append(f"{_short(g.label, 32):<32} {len(g.runs):>4}  {cells[0]:>18}  {cells[1]:>20}  {cells[2]:>22}"
                     f"  ({seeds})")
    return "\n".join(lines)


def pareto_figure(groups: list[Setting]) -> Any:
    """Mean test reward vs mean KL per setting, error bars = std over seeds; each seed's run as a faint dot."""
    fig = _figure()
    ax = fig.subplots()
    kl_key = next((k for k in PARETO_KL if any(np.isfinite(g.values(k)).any() for g in groups)), PARETO_KL[0])
    for i, g in enumerate(groups):
        kl, reward = g.values(kl_key), g.values("eval_reward")
        (km, ks), (rm, rs) = _mean_std(kl), _mean_std(reward)
        ax.scatter(kl, reward, color=f"C{i % 10}", alpha=0.35, s=18, linewidths=0)
        ax.errorbar([km], [rm], xerr=[ks], yerr=[rs], fmt="o", color=f"C{i % 10}", capsize=4, markersize=7,
                    label=f"{_short(g.label)} ({len(g.runs)} runs)")
    which = "k3" if kl_key == PARETO_KL[0] else "exact"
    return _finish_xy(fig, ax, "Test reward vs KL to the base model (mean ± std over seeds)",
                      f"KL to the base model, {which}, per completion (nats)", "test-split mean reward")


def _finish_xy(fig: Any, ax: Any, title: str, xlabel: str, ylabel: str) -> Any:
    fig.suptitle(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(handles)), fontsize=9, frameon=False)
    return fig


# ---- the command ---------------------------------------------------------------------------------------

def _names(run_dirs: list[str]) -> list[str]:
    """Each run's folder name, or its path where two folder names are the same."""
    base = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    return [b if base.count(b) == 1 else os.path.normpath(d) for b, d in zip(base, run_dirs)]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m hpc_es report",
                                description="Figures (PNG) and a text summary of runs, read from their ledgers.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default=None,
                   help="folder for the figures (default RUN_DIR/report; with several runs, one subfolder per "
                        "run, and the overlay in DIR, or in the first run's report folder)")
    p.add_argument("--pareto", action="store_true",
                   help="compare settings instead: final test reward vs KL to the base model, mean ± std over "
                        "seeds, as a table and pareto.png (in --out, or the first run's report folder)")
    args = p.parse_args(argv)
    _figure()  # the missing extra is the first thing to say
    runs = []
    for run_dir, name in zip(args.run_dirs, _names(args.run_dirs)):
        run, notes = load_run(run_dir, name)
        for note in notes:
            print(f"hpc_es: warning: {run.name}: {note}", file=sys.stderr, flush=True)
        runs.append(run)
    if args.pareto:
        groups = settings(runs)
        print(pareto_table(groups), flush=True)
        path = save(pareto_figure(groups), os.path.join(args.out or os.path.join(runs[0].run_dir, "report"),
                                                        "pareto.png"))
        print(f"figures: {path}", flush=True)
        return 0
    written: list[str] = []
    several = len(runs) > 1
    for run in runs:
        print(format_summary(summarise(run)), flush=True)
        if not run.rows:
            print("  (no iterations recorded yet: no figures)")
            continue
        out = (os.path.join(args.out, run.name.replace(os.sep, "_")) if args.out and several
               else args.out or os.path.join(run.run_dir, "report"))
        written.append(save(reward_figure(run), os.path.join(out, "reward.png")))
        written.append(save(time_figure(run), os.path.join(out, "time.png")))
    if several and any(r.rows for r in runs):
        out = args.out or os.path.join(runs[0].run_dir, "report")
        written.append(save(overlay_figure([r for r in runs if r.rows]), os.path.join(out, "reward_overlay.png")))
    if written:
        print("figures: " + " ".join(written), flush=True)
    return 0
