"""``search_merge``: merge weights (and density) chosen by measurement — the worst task's retention on val.

Why: ``--weights 0.5,0.5`` is a guess. Halving each adapter halves its update, and the merged model keeps only
part of what each adapter learned; which weights keep most of every task depends on the adapters. lorakit's
merges are exact low-rank sums, so a candidate costs no disk: the base is loaded once and every trial writes
W + Σ wᵢ·ΔWᵢ into its weights in memory (:mod:`lorakit.merge.in_memory`), then scores each task's cached val
token stream with the perplexity method of :mod:`lorakit.evaluate.core` (tokenized once).

The objective. Task t belongs to adapter t (``data`` lists one prepared-data folder per adapter, in order). Its
retention is :func:`lorakit.evaluate.retention.retention` of one score, the share of the adapter's own gain over
the base that the merge keeps; the base's and each adapter's score are measured once. The search maximises the
worst task's retention (ties: the higher mean retention, then the earlier trial). ``objective`` picks the score:

- ``"nll"`` (cheap): val NLL of the task's token stream, (nll_base − nll_merged) / (nll_base − nll_adapter);
  one forward pass per task per trial.
- ``"accuracy"``: greedy exact match on the val examples (:func:`lorakit.evaluate.accuracy.task_accuracy`, the
  scorer the release scorecard and gate use), (em_merged − em_base) / (em_adapter − em_base). It measures what the
  release promises, answers, at the price of generation per trial; instruction or chat data only (``text`` has no
  answers). Exact match moves in steps of 1/examples, so many points tie; the tie-break above then decides.
- ``"auto"`` (default): accuracy when every task's prepared data has answers, else nll
  (:func:`lorakit.merge.objectives.resolve_objective`); the record says which ran and why.

Trials, in order, bounded by ``max_trials`` and ``time_budget_s`` (counted from the call; no trial starts after
it is spent, the first always runs):

1. the baseline every result is shown beside (role ``uniform``: equal weights): ``linear`` 1/n, the usual
   default merge, or, when the first method is ``regmean``, RegMean itself (1.0 each);
2. per method in ``methods`` (the trial budget split evenly between them): a deterministic Nelder–Mead
   (:mod:`lorakit.merge.simplex`) over the weights in ``weight_bounds`` (and the density in
   ``DENSITY_BOUNDS`` for ties/DARE/pruning unless ``density`` is given), started from the best point so far
   (``regmean``: from its own best point, 1.0 each before it has one).

RegMean (:mod:`lorakit.merge.regmean`) is searched the same way. Its solution is linear in the task weights: it
re-projects each adapter's A once (the Gram matrices of each task's training inputs, read from the same ``data``
folders' train splits), and its merge is then the exact weighted sum of the projected updates. So the projection
runs once, before the trials, and every trial weighs the projected updates as ΔWᵢ; the output is written from
the same projected adapters (no second pass over the data). Why search it: RegMean's own weights (1.0 each) fit
each task's layer outputs in least squares, not its answers, and which weights keep the answers of stronger
adapters moved more than ten points of val exact match between training seeds (docs/merge.md).

Honest selection: trials read the val splits only. After the choice, when every data folder has a test split,
the chosen and the uniform merge (and the base and adapters, for the denominators) are scored on test for the
report; nothing measured there feeds back. The output is then written by the normal exact path
(:func:`lorakit.merge.merge_adapters`) with the chosen parameters, atomically, its ``lorakit_merge.json`` holding
every trial under ``search``; re-running a trial's ``params`` reproduces its numbers exactly.

With ``target_retention``, a search whose best trial stays below it still writes that best trial and says so
(``search.met_target`` false, a warning), so the caller decides.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import InputError
from lorakit.evaluate.core import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN, score_windows
from lorakit.evaluate.retention import retention
from lorakit.evaluate.windows import Window, plan_windows
from lorakit.merge.method import MergeMethod
from lorakit.merge.objectives import DEFAULT_OBJECTIVE, OBJECTIVE_CHOICES, OBJECTIVES, resolve_objective
from lorakit.merge.options import MERGE, MERGE_SEARCH
from lorakit.merge.simplex import Exhausted, minimize

DEFAULT_MAX_TRIALS = MERGE_SEARCH.max_trials
DEFAULT_TIME_BUDGET_S = MERGE_SEARCH.time_budget_s
DEFAULT_WEIGHT_BOUNDS = (0.0, 2.0)
DENSITY_BOUNDS = (0.1, 1.0)
START_DENSITY = 0.5
_DECIMALS = 4  # trial parameters are rounded before they are measured: the record is the point that was measured


@dataclass
class TaskStream:
    """One task's evaluation data: its val (and test) token streams and windows, tokenized once."""

    name: str
    data: str
    adapter: str
    streams: dict[str, tuple[torch.Tensor, list[Window]]]  # split -> (ids, windows); objective "nll"
    examples: dict[str, Any] = field(default_factory=dict)  # split -> TaskExamples; objective "accuracy"

    def splits(self) -> set[str]:
        return set(self.streams) | set(self.examples)


@dataclass
class Trial:
    index: int
    role: str  # "uniform" | "search"
    method: str
    params: dict[str, Any]  # {"weights": [...], and the method's parameters}: merge_adapters keyword arguments
    nll: dict[str, float] | None  # per task, objective "nll" (None otherwise: not measured)
    retention: dict[str, float]
    worst_retention: float
    seconds: dict[str, float] = field(default_factory=dict)  # apply (merge in memory), eval, total
    exact_match: dict[str, float] | None = None  # per task, objective "accuracy"
    mean_retention: float | None = None  # the tie-break between trials of equal worst-task retention


def baseline_weights(method: MergeMethod, n: int) -> list[float]:
    """The unsearched weights of ``method``: RegMean itself is 1.0 each (its fit already divides the updates between
    the tasks); every other method's usual default is the 1/n average."""
    return [1.0] * n if method.name == "regmean" else [1.0 / n] * n


def best_trial(trials: Sequence[Trial]) -> Trial:
    """The highest worst-task retention; ties (frequent with exact match): higher mean retention, earlier trial."""
    return max(trials, key=lambda t: (t.worst_retention, t.mean_retention or 0.0, -t.index))


@dataclass
class SearchOutcome:
    """What the search chose and measured (``record`` is what ``lorakit_merge.json`` holds under ``search``)."""

    chosen: Trial
    uniform: Trial
    record: dict[str, Any]


def parse_data(data: Sequence[str] | dict[str, str]) -> list[tuple[str, str]]:
    """``["reverse=prep/rev", ...]`` or ``{name: folder}`` -> [(name, folder)] in order."""
    if isinstance(data, dict):
        return [(str(k), str(v)) for k, v in data.items()]
    out = []
    for item in data:
        name, sep, path = str(item).partition("=")
        if not sep or not name or not path:
            raise InputError(f"--data {item!r} is not NAME=PREP; pass one per adapter, e.g. --data reverse=prep/reverse")
        out.append((name, path))
    return out


def check_search_bounds(max_trials: int, time_budget_s: float, weight_bounds: Sequence[float],
                        target_retention: float | None, objective: str = DEFAULT_OBJECTIVE) -> None:
    if objective not in OBJECTIVE_CHOICES:
        raise InputError(f"unknown search objective {objective!r}; choose one of {', '.join(OBJECTIVE_CHOICES)}")
    if int(max_trials) < 1:
        raise InputError(f"--max-trials must be at least 1 (the uniform baseline is the first trial), got {max_trials}")
    if not (math.isfinite(float(time_budget_s)) and float(time_budget_s) > 0):
        raise InputError(f"--time-budget must be a positive number of seconds, got {time_budget_s}")
    lo, hi = (float(x) for x in weight_bounds)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise InputError(f"weight bounds must be two finite numbers lo < hi, got {list(weight_bounds)}")
    if target_retention is not None and not math.isfinite(float(target_retention)):
        raise InputError(f"--target-retention must be a finite number, got {target_retention}")


class Evaluator:
    """Per-task score of the in-memory merge (val NLL on cached token streams, or greedy exact match on the val
    examples); the base and adapter scores are measured once."""

    def __init__(self, merge, tasks: list[TaskStream], *, batch_size: int, objective: str = "nll",
                 inputs: dict[str, list] | None = None):
        self.merge, self.tasks, self.batch_size = merge, tasks, batch_size
        self.objective = objective
        # method name -> the updates it weighs instead of the loaded adapters (regmean: the re-projected ones)
        self.inputs = inputs or {}
        self.metric, self.higher_is_better, _ = OBJECTIVES[objective]
        self._eval_model = None

    def _loaded(self):
        """The in-memory model as the accuracy scorer's :class:`EvalModel` (its weights change under it per trial)."""
        if self._eval_model is None:
            from lorakit.evaluate.loading import EvalModel, describe_model, load_tokenizer

            spec = describe_model(str(self.merge.base_dir))
            self._eval_model = EvalModel(spec, self.merge.model, "in-memory merge", self.merge.device, "float32",
                                         0.0, tokenizer=load_tokenizer(spec))
        return self._eval_model

    def score(self, task: TaskStream, split: str) -> float:
        if self.objective == "accuracy":
            from lorakit.evaluate.accuracy import task_accuracy

            result = task_accuracy(self._loaded(), task.examples[split], progress=False)
            return float(result.exact_match)
        ids, windows = task.streams[split]
        total, count, _ = score_windows(self.merge.model, ids, windows, batch_size=self.batch_size,
                                        device=self.merge.device, progress=False)
        return total / count

    def all_scores(self, split: str) -> dict[str, float]:
        return {t.name: self.score(t, split) for t in self.tasks}

    def base_scores(self, split: str) -> dict[str, float]:
        self.merge.restore()
        return self.all_scores(split)

    def adapter_scores(self, split: str) -> dict[str, float]:
        """Each adapter alone (weight 1, the others 0) on its own task: the linear merge of a one-hot weight."""
        from lorakit.merge.linear import LINEAR

        n = len(self.tasks)
        out = {}
        for i, task in enumerate(self.tasks):
            self.merge.apply(LINEAR, [1.0 if j == i else 0.0 for j in range(n)], {})
            out[task.name] = self.score(task, split)
        return out

    def merged_scores(self, method: MergeMethod, params: dict[str, Any], split: str
                      ) -> tuple[dict[str, float], float]:
        """(score per task, seconds spent applying the merge)."""
        t0 = time.perf_counter()
        self.merge.apply(method, params["weights"], {k: v for k, v in params.items() if k != "weights"},
                         adapters=self.inputs.get(method.name))
        if self.merge.device.type == "cuda":
            torch.cuda.synchronize()
        apply_s = time.perf_counter() - t0
        return self.all_scores(split), apply_s

    def retentions(self, base: dict[str, float], adapter: dict[str, float], merged: dict[str, float]
                   ) -> dict[str, float]:
        return {k: retention(base[k], adapter[k], merged[k], higher_is_better=self.higher_is_better).value
                for k in merged}


class _Runner:
    """Runs and records trials; enforces the bounds; caches repeated points (a repeat is not a new trial)."""

    def __init__(self, evaluator: Evaluator, base: dict[str, float], adapter: dict[str, float], *,
                 max_trials: int, deadline: float, progress: bool):
        self.ev, self.base, self.adapter = evaluator, base, adapter
        self.max_trials, self.deadline, self.progress = max_trials, deadline, progress
        self.trials: list[Trial] = []
        self.cache: dict[tuple, Trial] = {}
        self.stopped = "converged"  # why the current method's search ended

    def run(self, method: MergeMethod, params: dict[str, Any], role: str = "search",
            max_trials: int | None = None, deadline: float | None = None) -> Trial:
        key = (method.name, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items())))
        if key in self.cache:
            return self.cache[key]
        if self.trials and len(self.trials) >= min(self.max_trials, max_trials or self.max_trials):
            self.stopped = "max_trials"
            raise Exhausted("max_trials")
        if self.trials and time.perf_counter() >= min(self.deadline, deadline or self.deadline):
            self.stopped = "time_budget"
            raise Exhausted("time_budget")
        t0 = time.perf_counter()
        scores, apply_s = self.ev.merged_scores(method, params, "val")
        total = time.perf_counter() - t0
        ret = self.ev.retentions(self.base, self.adapter, scores)
        by_metric = {"nll": None, "exact_match": None, self.ev.metric: scores}
        trial = Trial(len(self.trials), role, method.name, params, by_metric["nll"], ret, min(ret.values()),
                      {"apply": round(apply_s, 4), "eval": round(total - apply_s, 4), "total": round(total, 4)},
                      exact_match=by_metric["exact_match"], mean_retention=sum(ret.values()) / len(ret))
        self.trials.append(trial)
        self.cache[key] = trial
        if self.progress:
            from lorakit.progress import emit

            shown = ", ".join(f"{k} {v:g}" if not isinstance(v, list) else f"{k} {','.join(f'{x:g}' for x in v)}"
                              for k, v in params.items() if k in ("weights", "density"))  # what is searched
            emit(f"merge search trial {trial.index + 1}: {method.name} {shown} -> worst-task retention "
                 f"{trial.worst_retention:.3f} ({total:.1f}s)")
        return trial


def _point_to_params(x: Sequence[float], n: int, fixed: dict[str, Any], search_density: bool) -> dict[str, Any]:
    params: dict[str, Any] = {"weights": [float(v) for v in x[:n]]}
    params.update(fixed)
    if search_density:
        params["density"] = float(x[n])
    return params


def run_search(evaluator: Evaluator, methods: list[MergeMethod], fixed_params: dict[str, dict[str, Any]],
               *, max_trials: int, time_budget_s: float, started: float, weight_bounds: Sequence[float],
               progress: bool) -> tuple[list[Trial], Trial, Trial, dict[str, Any]]:
    """The trials (uniform first, then a simplex search per method); returns (trials, chosen, uniform, info)."""
    from lorakit.merge.linear import LINEAR

    n = len(evaluator.tasks)
    t0 = time.perf_counter()
    base_val = evaluator.base_scores("val")
    eval_pass_s = time.perf_counter() - t0
    adapter_val = evaluator.adapter_scores("val")
    higher = evaluator.higher_is_better
    for task in evaluator.tasks:
        r = retention(base_val[task.name], adapter_val[task.name], adapter_val[task.name], higher_is_better=higher)
        if not r.learned:
            what = "raise the val exact match" if higher else "lower the val NLL"
            raise InputError(
                f"the adapter for {task.name} did not learn it: {task.adapter} does not {what} of its task "
                f"({task.data}): base {base_val[task.name]:.4f}, adapter {adapter_val[task.name]:.4f}; it has no gain "
                "to keep, so no weight can be chosen for it: retrain it, or check that --data lists the tasks in "
                "adapter order"
            )
    deadline = started + float(time_budget_s)
    runner = _Runner(evaluator, base_val, adapter_val, max_trials=max_trials, deadline=deadline, progress=progress)
    first = methods[0] if methods[0].name == "regmean" else LINEAR
    uniform = runner.run(first, {"weights": baseline_weights(first, n), **fixed_params.get(first.name, {})},
                         role="uniform")
    stopped: dict[str, str] = {}
    lo_w, hi_w = (float(x) for x in weight_bounds)
    remaining = max_trials - 1
    for k, method in enumerate(methods):
        share = remaining * (k + 1) // len(methods) + 1  # cumulative trial cap after this method
        method_deadline = started + float(time_budget_s) * (k + 1) / len(methods)
        fixed = dict(fixed_params[method.name])
        search_density = "density" in fixed and fixed["density"] is None
        if search_density:
            del fixed["density"]
        # RegMean weighs projected updates: its points and the other methods' do not mean the same weights
        alike = [t for t in runner.trials if (t.method == "regmean") == (method.name == "regmean")]
        start = best_trial(alike).params["weights"] if alike else baseline_weights(method, n)
        x0 = [min(max(w, lo_w), hi_w) for w in start]
        lo, hi, steps = [lo_w] * n, [hi_w] * n, [0.25 * (hi_w - lo_w)] * n
        if search_density:
            x0.append(START_DENSITY)
            lo.append(DENSITY_BOUNDS[0])
            hi.append(DENSITY_BOUNDS[1])
            steps.append(0.25)

        def objective(x: tuple[float, ...]) -> float:
            params = _point_to_params(x, n, fixed, search_density)
            return -runner.run(method, params, max_trials=share, deadline=method_deadline).worst_retention

        runner.stopped = "converged"
        try:
            minimize(objective, x0, steps, lo, hi, decimals=_DECIMALS)
        except Exhausted:
            pass
        stopped[method.name] = runner.stopped
    chosen = best_trial(runner.trials)
    per_trial = [t.seconds["total"] for t in runner.trials]
    info = {"base": base_val, "adapter": adapter_val, "base_pass_s": round(eval_pass_s, 4),
            "stopped": stopped,
            "trial_s_median": round(sorted(per_trial)[len(per_trial) // 2], 4),
            "apply_s_median": round(sorted(t.seconds["apply"] for t in runner.trials)[len(per_trial) // 2], 4)}
    # A trial = applying the merge + one val evaluation pass of the merged model; the ratio is its overhead.
    ratios = sorted(t.seconds["total"] / max(t.seconds["eval"], 1e-9) for t in runner.trials)
    info["trial_vs_eval_pass"] = round(ratios[len(ratios) // 2], 4)
    return runner.trials, chosen, uniform, info


def test_report(evaluator: Evaluator, chosen: Trial, uniform: Trial) -> dict[str, Any]:
    """Worst-task retention of the chosen and the uniform merge on test, denominators measured on test too."""
    from lorakit.merge.registry import get_method

    metric, higher = evaluator.metric, evaluator.higher_is_better
    base, adapter = evaluator.base_scores("test"), evaluator.adapter_scores("test")
    out: dict[str, Any] = {f"base_{metric}": base, f"adapter_{metric}": adapter}
    for label, trial in (("chosen", chosen), ("uniform", uniform)):
        scores, _ = evaluator.merged_scores(get_method(trial.method), trial.params, "test")
        ret = evaluator.retentions(base, adapter, scores)
        # None where an adapter did not gain on its own task's test split: retention is undefined there, not a number
        worst = None if any(v is None for v in ret.values()) else min(ret.values())
        out[label] = {metric: scores, "retention": ret, "worst_retention": worst}
    unlearned = [k for k in base if not retention(base[k], adapter[k], adapter[k], higher_is_better=higher).learned]
    if unlearned:
        out["note"] = (f"the adapter of {', '.join(unlearned)} does not gain on its task's test split "
                       f"({metric}): retention on test is undefined (null) there")
    return out


def search_merge(
    adapters: Sequence[str | os.PathLike[str]],
    data: Sequence[str] | dict[str, str],
    output: str | os.PathLike[str],
    *,
    methods: Sequence[str] = tuple(MERGE_SEARCH.methods),
    objective: str = MERGE_SEARCH.objective,
    max_trials: int | None = None,
    time_budget_s: float | None = None,
    target_retention: float | None = None,
    weight_bounds: Sequence[float] = DEFAULT_WEIGHT_BOUNDS,
    density: float | None = MERGE.density,
    seed: int | None = MERGE.seed,
    normalize: bool | None = MERGE.normalize,
    regmean_alpha: float | None = MERGE.regmean_alpha,
    regmean_examples: int | None = MERGE.regmean_examples,
    regmean_anchor: float | None = MERGE.regmean_anchor,
    output_kind: str = "adapter",
    rank: int | None = None,
    base: str | os.PathLike[str] | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_tokens: int | None = None,
    max_examples: int | None = MERGE_SEARCH.max_examples,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
    force: bool = False,
    ignore_base_name: bool = False,
    compute_dtype: str = "auto",
    progress: bool = True,
):
    """Search merge parameters for the worst task's val retention, then write the chosen merge (module docstring).

    Returns the :class:`lorakit.merge.MergeResult` of the final write; its ``metadata["search"]`` holds every
    trial, the choice, the uniform baseline and the test-split report. Every input problem is an
    :class:`InputError` raised before the model is loaded, and nothing is written then. ``regmean_*``: method
    regmean's fixed parameters when ``methods`` includes it (it reads each task's train split from ``data``).
    """
    from lorakit.adapters import check_compatible, check_tied_targets, load_adapter
    from lorakit.compute import dtype_name, resolve_compute_dtype
    from lorakit.io.atomic import check_output_free
    from lorakit.merge import core
    from lorakit.merge.registry import get_method, resolve_params
    from lorakit.models.folder import read_model_config, tensor_index, ties_embeddings

    started = time.perf_counter()
    max_trials = DEFAULT_MAX_TRIALS if max_trials is None else int(max_trials)
    time_budget_s = DEFAULT_TIME_BUDGET_S if time_budget_s is None else float(time_budget_s)
    check_search_bounds(max_trials, time_budget_s, weight_bounds, target_retention, objective)
    compute = dtype_name(resolve_compute_dtype(compute_dtype, "merge", "cpu"))
    tasks_in = parse_data(data)
    if len(tasks_in) != len(adapters):
        raise InputError(f"got {len(tasks_in)} --data task(s) for {len(adapters)} adapter(s); pass one NAME=PREP per "
                         "adapter, in the adapters' order (task i is the one adapter i was trained for)")
    names = [name for name, _ in tasks_in]
    if len(set(names)) != len(names):
        raise InputError(f"--data task names must be unique, got {', '.join(names)}")
    if not methods:
        raise InputError("--methods is empty; pass at least one merge method, e.g. --methods linear")
    merge_methods = [get_method(m) for m in dict.fromkeys(methods)]
    fixed: dict[str, dict[str, Any]] = {}
    for m in merge_methods:
        given = {"density": density, "seed": seed, "normalize": normalize, "regmean_alpha": regmean_alpha,
                 "regmean_examples": regmean_examples, "regmean_anchor": regmean_anchor}
        probe = resolve_params(m, {k: (START_DENSITY if k == "density" and v is None else v) for k, v in
                                   given.items() if any(p.name == k for p in m.params)})
        fixed[m.name] = {k: (None if k == "density" and density is None else v) for k, v in probe.items()}
        core._check_plan(m, output_kind, rank)
    output = Path(output)
    check_output_free(output, force)
    if output.resolve() in [Path(a).resolve() for a in adapters]:
        raise InputError(f"output {output} is one of the inputs; write the merge to a new folder")

    loaded = [load_adapter(a) for a in adapters]
    check_compatible(loaded, ignore_base_name=ignore_base_name)
    for a in loaded:
        if a.dora or a.loftq:
            raise InputError(f"adapter {a.label} is a {'DoRA' if a.dora else 'LoftQ'} adapter, whose update depends on "
                             "the base weights; --search merges plain LoRA adapters: merge it with --weights instead")
    base_dir = core._base_dir(loaded, base, required=True)
    check_tied_targets(loaded, ties_embeddings(read_model_config(base_dir)), str(base_dir))
    core._check_base_fits(loaded, base_dir, tensor_index(base_dir))
    objective, objective_why = resolve_objective(objective, [_prep_format(name, prep) for name, prep in tasks_in])
    tasks = task_streams(tasks_in, loaded, base_dir, seq_len, max_tokens, objective, max_examples)
    with_test = all("test" in t.splits() for t in tasks)

    from lorakit.evaluate.loading import pick_device
    from lorakit.merge.in_memory import InMemoryMerge
    from lorakit.progress import activity, emit

    inputs, fitted, regmean_data = {}, None, None
    regmean = fixed.get("regmean")
    if regmean is not None:  # the same projection for every weight: once (its memory checked first), before the base loads
        from lorakit.merge.regmean import check_data, regmean_adapters

        regmean_data = check_data(loaded, [prep for _, prep in tasks_in], regmean["regmean_alpha"],
                                  regmean["regmean_examples"], regmean["regmean_anchor"])
        fitted = regmean_adapters(loaded, base_dir, regmean_data, alpha=regmean["regmean_alpha"],
                                  examples=regmean["regmean_examples"], anchor=regmean["regmean_anchor"],
                                  progress=progress)
        inputs["regmean"] = fitted[0]
    with activity("merge search: loading the base"):
        merge = InMemoryMerge(base_dir, loaded, pick_device(device))
    evaluator = Evaluator(merge, tasks, batch_size=batch_size, objective=objective, inputs=inputs)
    with activity("merge search"):
        trials, chosen, uniform, info = run_search(
            evaluator, merge_methods, fixed, max_trials=max_trials, time_budget_s=time_budget_s, started=started,
            weight_bounds=weight_bounds, progress=progress)
        test = test_report(evaluator, chosen, uniform) if with_test else None
    met = None if target_retention is None else chosen.worst_retention >= float(target_retention)
    metric = evaluator.metric
    record = {
        "objective": OBJECTIVES[objective][2],
        "objective_name": objective,
        "objective_chosen_by": objective_why,  # with objective auto: which one it ran, and why
        "metric": metric,
        "split": "val",
        "tasks": {t.name: {"data": t.data, "adapter": t.adapter, f"base_{metric}": info["base"][t.name],
                           f"adapter_{metric}": info["adapter"][t.name], **_val_size(t)} for t in tasks},
        "method": {"seq_len": int(seq_len), "stride": int(seq_len), "max_tokens": max_tokens, "max_examples": max_examples,
                   "batch_size": int(batch_size), "dtype": "float32", "device": str(merge.device)},
        "methods": [m.name for m in merge_methods],
        "bounds": {"max_trials": max_trials, "time_budget_s": time_budget_s, "weights": [float(x) for x in weight_bounds],
                   "density": list(DENSITY_BOUNDS) if any(v.get("density", 0) is None for v in fixed.values()) else None},
        "target_retention": target_retention,
        "met_target": met,
        "stopped": info["stopped"],
        "n_trials": len(trials),
        "chosen": chosen.index,
        "uniform": uniform.index,
        "base_pass_s": info["base_pass_s"],  # the base's val pass: the first, so it includes warm-up
        "trial_s_median": info["trial_s_median"],
        "apply_s_median": info["apply_s_median"],
        "trial_vs_eval_pass": info["trial_vs_eval_pass"],
        "search_s": round(time.perf_counter() - started, 3),
        "report": {"val": {"chosen": chosen.worst_retention, "uniform": uniform.worst_retention},
                   "test": None if test is None else {"chosen": test["chosen"]["worst_retention"],
                                                      "uniform": test["uniform"]["worst_retention"]}},
        "test": test,
        "trials": [asdict(t) for t in trials],
    }
    del merge, evaluator
    if met is False:
        print(f"warning: no trial reached worst-task retention {target_retention:g} within the bounds "
              f"({len(trials)} trials); writing the best one ({chosen.worst_retention:.4f})", file=sys.stderr)
    emit(f"merge search: chose trial {chosen.index + 1} of {len(trials)}; writing it")
    p = chosen.params
    return core.merge_adapters(
        adapters, p["weights"], output, method=chosen.method, output_kind=output_kind, rank=rank, base=base,
        density=p.get("density"), seed=p.get("seed"), normalize=p.get("normalize"),
        data=regmean_data if chosen.method == "regmean" else None,
        regmean_alpha=p.get("regmean_alpha"), regmean_examples=p.get("regmean_examples"),
        regmean_anchor=p.get("regmean_anchor"), fitted=fitted if chosen.method == "regmean" else None, force=force,
        ignore_base_name=ignore_base_name, compute_dtype=compute, progress=progress, record={"search": record},
        started=started)  # the record's wall_time_s: the whole stage, search and write


def _val_size(task: TaskStream) -> dict[str, int]:
    if "val" in task.examples:
        return {"val_examples": len(task.examples["val"].records)}
    return {"val_tokens": int(sum(w.n_scored for w in task.streams["val"][1]))}


def task_streams(tasks_in: list[tuple[str, str]], loaded, base_dir: Path, seq_len: int,
                 max_tokens: int | None, objective: str = "nll", max_examples: int | None = None
                 ) -> list[TaskStream]:
    """Each task's val (and test, when present) data, read once: token streams and windows tokenized with the
    base's tokenizer (objective "nll"), or the examples with their prompts and answers (objective "accuracy");
    only the first ``max_examples`` of each split, either way."""
    from lorakit.data.splits import has_split
    from lorakit.evaluate.loading import describe_model, load_tokenizer
    from lorakit.evaluate.text import read_eval_texts, tokenize_eval_texts

    tokenizer = load_tokenizer(describe_model(str(base_dir)))
    out = []
    for (name, prep), adapter in zip(tasks_in, loaded):
        if not Path(prep).is_dir():
            raise InputError(f"--data {name}={prep}: not a prepared-data folder; create it with `lorakit prep`")
        task = TaskStream(name, str(prep), str(adapter.path), {})
        for split in ("val", "test"):
            if split == "test" and not has_split(prep, "test"):
                continue
            if objective == "accuracy":
                task.examples[split] = _accuracy_examples(name, prep, split, tokenizer, max_examples)
                continue
            tokens = tokenize_eval_texts(read_eval_texts(prep, split, max_examples), tokenizer, max_tokens=max_tokens)
            windows = plan_windows(int(tokens.ids.numel()), seq_len, seq_len,
                                   source=f"the {split} split of {name} ({prep})")
            task.streams[split] = (tokens.ids, windows)
        out.append(task)
    return out


def _prep_format(name: str, prep: str) -> str:
    """The prepared format of one task's data (prep.json's ``format``; "unknown" when it has none): what
    objective ``auto`` is chosen by."""
    from lorakit.data.splits import PREP_META
    from lorakit.io.atomic import read_json

    meta = Path(prep) / PREP_META
    if not meta.is_file():
        raise InputError(f"--data {name}={prep}: not a prepared-data folder (no {PREP_META}); create it with "
                         "`lorakit prep`")
    return str(read_json(meta, "prepared-data metadata").get("format", "unknown"))


def _accuracy_examples(name: str, prep: str, split: str, tokenizer, max_examples: int | None = None):
    """The split's examples for greedy exact match; text data (no answers) is refused before any model loads."""
    from lorakit.evaluate.accuracy import check_prep_tokenizer, read_task_examples

    examples = read_task_examples(prep, split, max_examples)
    if examples.skipped:
        raise InputError(f"--data {name}={prep} is text-format data: it has no reference answers, so the accuracy "
                         "objective cannot score it; prepare instruction or chat data, or use --objective nll")
    check_prep_tokenizer(examples, tokenizer, "the adapters' base")
    return examples
