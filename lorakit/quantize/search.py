"""``search_quantization``: the smallest GPTQ/AWQ configuration that meets a perplexity target, within bounds.

Why: one fixed configuration does not fit every model. On SmolLM2-135M and held-out stdlib docstrings, GPTQ
4-bit g64 sym loses 21.4% perplexity and g32 asym 10.1% (bench/results/quantize.json ``runs.*.ppl_vs_fp32``); a
5% release gate rejects both, and a release flow whose default always fails its own gate
ships nothing. So lorakit measures instead of guessing. Every trial is a real quantization followed by
``lorakit.evaluate.perplexity`` of the candidate on the run's validation data, with the same method (token
stream, windows, dtype, dequantized path) as the baseline measured once at the start, exactly as the gate
will measure it; with ``eval_general`` the gate's general text is scored the same way, and a trial passes only
when every scored text is within the target (the gate judges each).

Order of trials (two phases, bounded by ``max_trials``, ``time_budget_s`` and ``max_size_bytes``):

1. Uniform configurations, smallest predicted file first (group size 128 → 64 → 32, methods in the order
   given). Within one size tier the variants (asym/sym, act-order, calibration size) are tried best-expected
   first; the others only while the tier's best one missed the target by less than ``variant_margin``× (they
   differ in second-order effects, so a tier that missed by far is not worth their minutes). The first uniform
   configuration that passes is the smallest uniform one, and the search stops there.
2. If none passed: per-module precision, greedily. Modules are ranked by measured sensitivity
   (:mod:`lorakit.quantize.sensitivity`) on the grid of the method's best uniform trial, and the top
   k = ``mixed_steps`` modules are kept at higher precision (AWQ: fp16, still loadable with plain
   transformers; GPTQ: 8 bits through GPTQModel ``dynamic``, which plain transformers does not load, so AWQ
   goes first by default). Each k is one trial; the first passing k ends that method.

The pick: among passing trials, plain-transformers-loadable first, then the smallest file. When nothing passes
the search says so (``search.passed = false``, a warning) and writes the trial with the lowest degradation, so
the release gate rejects it as it would any failing model. Every trial's ``params`` are ``quantize_model``
keyword arguments: re-running one with the same model and calibration data reproduces it (seeded, and the
recorded calibration digest pins the data).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorakit.quantize.options import QUANTIZE, RELEASE_TARGET_DEGRADATION, TUNE_KEYS, resolve_grid
from lorakit.errors import InputError
from lorakit.io.atomic import atomic_dir, check_output_free, write_json
from lorakit.quantize.checks import METHODS, check_model, resolve_group_size
from lorakit.quantize.metadata import QUANT_META
from lorakit.quantize.mixed import KEEP_BITS, plain_transformers_loads, predicted_size_bytes


@dataclass
class SearchSpace:
    """What the search may vary. Tuple order = preference (tried first) at equal predicted size."""

    methods: tuple[str, ...] = ("awq", "gptq")
    group_sizes: tuple[int, ...] = (128, 64, 32)
    sym: tuple[bool, ...] = (False, True)
    desc_act: tuple[bool, ...] = (True, False)  # GPTQ only
    n_samples: tuple[int | None, ...] = (None,)  # None: 64, or what the calibration data gives (calibration.py)
    mixed_steps: tuple[int, ...] = (2, 4, 8, 16, 30)
    variant_margin: float = 2.0
    max_mixed_fraction: float = 0.25  # never keep more than this share of the linears at higher precision
    bits: int = 4


@dataclass
class SearchBounds:
    max_trials: int = QUANTIZE.max_trials
    time_budget_s: float = QUANTIZE.time_budget_s
    max_size_bytes: int | None = None


@dataclass
class Trial:
    index: int
    phase: str  # "uniform" | "mixed"
    params: dict[str, Any]  # quantize_model keyword arguments (calib and paths aside)
    predicted_size_bytes: int
    size_bytes: int | None = None
    ppl: float | None = None
    degradation: float | None = None
    passed: bool = False
    quantize_s: float | None = None
    eval_s: float | None = None
    checks: dict[str, dict[str, float]] = field(default_factory=dict)  # per scored text: ppl, degradation
    plain_transformers: bool = True
    loaders: list[str] = field(default_factory=list)
    error: str | None = None


def _params(method: str, bits: int, group: int, sym: bool, desc_act: bool, n_samples: int, seq_len: int,
            seed: int, module_bits: dict[str, int] | None = None) -> dict[str, Any]:
    return {"method": method, "bits": bits, "group_size": group, "sym": sym,
            "desc_act": desc_act if method == "gptq" else False, "n_samples": n_samples, "seq_len": seq_len,
            "seed": seed, "strict_group_size": True, "module_bits": dict(sorted((module_bits or {}).items()))}


def _uniform_tiers(config: dict, space: SearchSpace, seq_len: int, seed: int, skipped: list,
                   keep_sensitive: int = 0) -> list[list[dict]]:
    """Uniform candidates grouped into (method, group size) tiers, tiers sorted by predicted size."""
    tiers = []
    for mi, method in enumerate(space.methods):
        for group in space.group_sizes:
            try:
                resolve_group_size(config, group, strict=True)
            except InputError as exc:
                skipped.append({"method": method, "group_size": group, "reason": str(exc)})
                continue
            variants = []
            for n in space.n_samples:
                for sym in space.sym:
                    for act in (space.desc_act if method == "gptq" else (False,)):
                        variants.append(_params(method, space.bits, group, sym, act, n, seq_len, seed))
            # best-expected first: asym before sym, act-order before none, more calibration before less
            variants.sort(key=lambda p: (space.sym.index(p["sym"]),
                                         space.desc_act.index(p["desc_act"]) if method == "gptq" else 0,
                                         space.n_samples.index(p["n_samples"])))
            size = predicted_size_bytes(config, method=method, bits=space.bits, group_size=group,
                                        keep_sensitive=keep_sensitive)
            tiers.append((size, mi, variants))
    tiers.sort(key=lambda t: (t[0], t[1]))
    return [t[2] for t in tiers]


def search_quantization(
    model_dir: str | os.PathLike[str] | None,
    output: str | os.PathLike[str],
    *,
    calib: str | os.PathLike[str],
    eval_data: str | os.PathLike[str] | list[str] | None = None,
    target_degradation: float = RELEASE_TARGET_DEGRADATION,
    space: SearchSpace | None = None,
    bounds: SearchBounds | None = None,
    seq_len: int = QUANTIZE.seq_len,
    eval_seq_len: int = 512,
    eval_max_tokens: int | None = None,
    eval_general: str | os.PathLike[str] | None = None,
    eval_general_max_tokens: int | None = None,
    calib_general: str | os.PathLike[str] | None = QUANTIZE.calib_general,
    calib_general_fraction: float = QUANTIZE.calib_general_fraction,
    awq_scale_form: str = QUANTIZE.awq_scale_form,
    gptaq_alpha: float | None = QUANTIZE.gptaq_alpha,
    clip_search: bool = QUANTIZE.clip_search,
    keep_sensitive: int = QUANTIZE.keep_sensitive,
    tune_steps: int = QUANTIZE.tune_steps,
    tune_lr: float = QUANTIZE.tune_lr,
    tune_general_fraction: float = QUANTIZE.tune_general_fraction,
    tune_tokens: str = QUANTIZE.tune_tokens,
    tune_answer_weight: float = QUANTIZE.tune_answer_weight,
    tune_samples: int | None = QUANTIZE.tune_samples,
    seed: int = QUANTIZE.seed,
    device: str = QUANTIZE.device,
    compute_dtype: str = "auto",
    force: bool = False,
    progress: bool = True,
):
    """Search the smallest configuration meeting ``target_degradation`` (see module docstring); write it to ``output``.

    ``eval_data`` defaults to ``calib`` when that is a prepared-data folder (its *val* split is scored, its
    train split calibrates). ``eval_general`` (the release gate's general text, capped at
    ``eval_general_max_tokens``) is scored too: a trial passes only when *every* scored text is within the target,
    and its degradation is the worst of them. ``calib_general``/``calib_general_fraction``: the calibration mix of
    :func:`~lorakit.quantize.core.quantize_model`, the same in every trial, as are ``clip_search``, ``keep_sensitive`` (its modules stay unquantized whatever a trial keeps), scale tuning (``tune_*``), ``awq_scale_form`` (AWQ trials) and ``gptaq_alpha`` (GPTQ trials). Returns the chosen trial's :class:`~lorakit.quantize.QuantResult`, whose
    ``lorakit_quant.json`` carries ``search`` (every trial, the pick, whether the target was met).
    """
    from lorakit.evaluate.core import perplexity, prepare_tokens
    from lorakit.evaluate.loading import describe_model, load_tokenizer
    from lorakit.models.folder import resolve_model_dir
    from lorakit.quantize.core import QuantResult, quantize_model
    from lorakit.quantize.sensitivity import module_sensitivity

    started = time.perf_counter()
    space = space or SearchSpace()
    bounds = bounds or SearchBounds()
    output = Path(output)
    if not 0 <= target_degradation < 10:
        raise InputError(f"--target-degradation {target_degradation} is out of range; pass a fraction such as 0.05")
    if bounds.max_trials < 1 or bounds.time_budget_s <= 0:
        raise InputError("--max-trials and --time-budget must be positive")
    bad = [m for m in space.methods if m not in METHODS]
    if bad or not space.methods:
        raise InputError(f"search methods {bad or '(none)'} are not supported; choose from {', '.join(METHODS)}")
    check_output_free(output, force)
    src = resolve_model_dir(model_dir)
    config = check_model(src)
    if eval_data is None:
        if not (Path(calib).is_dir()):
            raise InputError("--target-degradation needs validation data: pass --eval-data, or a prepared-data "
                             "folder as --calib (its val split is scored)")
        eval_data = calib
    from lorakit.gate.general import GENERAL_CHECK_NAME, resolve_general_text

    spec = describe_model(str(src))
    tokenizer = load_tokenizer(spec)
    streams = {"val": prepare_tokens(eval_data, tokenizer, max_tokens=eval_max_tokens)}
    general_path = resolve_general_text(eval_general)
    if general_path is not None:
        streams[GENERAL_CHECK_NAME] = prepare_tokens(general_path, tokenizer, max_tokens=eval_general_max_tokens)
    eval_kw = dict(seq_len=eval_seq_len, quant_path="dequantized", device=device, progress=False)
    baselines = {name: perplexity(str(src), toks, **eval_kw) for name, toks in streams.items()}
    base = baselines["val"]
    calib_kw = {"calib_general": calib_general, "calib_general_fraction": calib_general_fraction}
    fixed_kw = {**calib_kw, "awq_scale_form": awq_scale_form, "clip_search": clip_search,  # the same in every trial
                "keep_sensitive": keep_sensitive,
                "tune_steps": tune_steps, "tune_lr": tune_lr, "tune_general_fraction": tune_general_fraction,
                "tune_tokens": tune_tokens, "tune_answer_weight": tune_answer_weight, "tune_samples": tune_samples}
    from lorakit.progress import emit

    say = emit if progress else (lambda msg: None)  # timestamped, and into the Prefect logs under `lorakit run`
    say("search: baseline perplexity " + ", ".join(f"{b.ppl:.4f} on {b.tokens} tokens of {name}"
                                                    for name, b in baselines.items())
        + f"; target +{target_degradation:.1%} on each")

    trials: list[Trial] = []
    skipped: list[dict] = []
    stop_reason = "search space exhausted"
    root = output.parent / f".{output.name}.search-{os.getpid()}"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)

    def budget_left() -> str | None:
        if len(trials) >= bounds.max_trials:
            return f"max_trials ({bounds.max_trials}) reached"
        spent = time.perf_counter() - started
        done = [t for t in trials if t.quantize_s is not None]
        estimate = (sum(t.quantize_s + (t.eval_s or 0) for t in done) / len(done)) if done else 0.0
        if spent + estimate > bounds.time_budget_s:
            return f"time budget ({bounds.time_budget_s:.0f} s) would be exceeded (spent {spent:.0f} s)"
        return None

    def predicted(params: dict) -> int:  # a trial's file, the linears keep_sensitive will keep counted in
        return predicted_size_bytes(config, method=params["method"], bits=params["bits"],
                                    group_size=params["group_size"], module_bits=params["module_bits"],
                                    keep_sensitive=keep_sensitive)

    def run(phase: str, params: dict) -> Trial:
        params = {**params, **fixed_kw}  # recorded with the trial: its params alone reproduce it (reproduce_trial)
        if params["method"] == "gptq":
            params["gptaq_alpha"] = gptaq_alpha
        trial = Trial(len(trials), phase, params, predicted(params),
                      plain_transformers=plain_transformers_loads(params["method"], params["module_bits"]))
        trials.append(trial)
        folder = root / f"trial-{trial.index:02d}"
        t0 = time.perf_counter()
        try:
            result = quantize_model(src, folder, calib=calib, device=device, compute_dtype=compute_dtype,
                                    progress=False, **params)
        except InputError as exc:
            trial.error = str(exc)
            say(f"search: trial {trial.index} {_label(params)}: error: {exc}")
            return trial
        trial.quantize_s = round(time.perf_counter() - t0, 2)
        trial.size_bytes = result.metadata["size_after_bytes"]
        trial.loaders = result.metadata["loaders"]
        t1 = time.perf_counter()
        for name, toks in streams.items():
            ppl = perplexity(str(folder), toks, **eval_kw).ppl
            trial.checks[name] = {"ppl": ppl, "degradation": ppl / baselines[name].ppl - 1}
        trial.eval_s = round(time.perf_counter() - t1, 2)
        trial.ppl = trial.checks["val"]["ppl"]
        trial.degradation = max(c["degradation"] for c in trial.checks.values())  # the worst scored text
        oversize = bool(bounds.max_size_bytes) and trial.size_bytes > bounds.max_size_bytes
        trial.passed = trial.degradation <= target_degradation and not oversize  # the bound holds on the real file
        per = ", ".join(f"{name} {c['degradation']:+.2%}" for name, c in trial.checks.items())
        verdict = "fail: over max_size_bytes" if oversize else "PASS" if trial.passed else "fail"
        say(f"search: trial {trial.index} {_label(params)}: {trial.size_bytes / 1e6:.1f} MB, ppl {trial.ppl:.4f} "
            f"({per}) {verdict} [{trial.quantize_s:.0f}+{trial.eval_s:.0f} s]")
        return trial

    sensitivity: dict[str, Any] = {}
    try:
        done = False
        for tier in _uniform_tiers(config, space, seq_len, seed, skipped, keep_sensitive):
            first = None
            for params in tier:
                if bounds.max_size_bytes and predicted(params) > bounds.max_size_bytes:
                    skipped.append({"params": params, "reason": "predicted size above max_size_bytes"})
                    continue
                if first is not None and (first.degradation is None
                                          or first.degradation > space.variant_margin * target_degradation):
                    skipped.append({"params": params, "reason": "tier's best-expected variant missed the target "
                                    f"by more than {space.variant_margin}x"})
                    continue
                reason = budget_left()
                if reason:
                    stop_reason, done = reason, True
                    break
                trial = run("uniform", params)
                first = first or trial
                if trial.passed:
                    stop_reason, done = "a uniform configuration passed (the smallest passing uniform one)", True
                    break
            if done:
                break
        if not any(t.passed for t in trials) and not stop_reason.startswith(("max_trials", "time budget")):
            order = sorted(space.methods, key=lambda m: not plain_transformers_loads(m, {"x": 1}))
            for method in order:
                ok = [t for t in trials if t.params["method"] == method and t.degradation is not None]
                if not ok:
                    continue
                best = min(ok, key=lambda t: t.degradation)
                from lorakit.quantize.calibration import build_calibration
                from lorakit.quantize.core import _load_tokenizer

                calibration = build_calibration(calib, _load_tokenizer(src), n_samples=best.params["n_samples"],
                                                seq_len=seq_len, seed=seed, general=calib_general,
                                                general_fraction=calib_general_fraction)
                sens = module_sensitivity(src, calibration.blocks, bits=best.params["bits"],
                                          group_size=best.params["group_size"], sym=best.params["sym"],
                                          device="cpu" if device == "auto" else device)
                sensitivity[method] = sens.to_dict()
                passed = False
                cap = int(space.max_mixed_fraction * len(sens.ranking))
                for k in [k for k in space.mixed_steps if 0 < k <= cap]:
                    keep = {m: KEEP_BITS[method] for m in sens.ranking[:k]}
                    params = dict(best.params, module_bits=dict(sorted(keep.items())))
                    if bounds.max_size_bytes and predicted(params) > bounds.max_size_bytes:
                        skipped.append({"params": params, "reason": "predicted size above max_size_bytes"})
                        break
                    reason = budget_left()
                    if reason:
                        stop_reason = reason
                        break
                    if run("mixed", params).passed:
                        passed = True
                        stop_reason = f"greedy per-module precision passed ({method}, {k} modules)"
                        break
                if passed and plain_transformers_loads(method, {"x": 1}):
                    break  # loadable with plain transformers: preferred over any later method
                if stop_reason.startswith(("max_trials", "time budget")):
                    break
        passing = [t for t in trials if t.passed]
        measured = [t for t in trials if t.degradation is not None]
        if not measured:
            why = "; ".join(t.error or "" for t in trials) or stop_reason
            if not trials and skipped:  # nothing ran: say what ruled every configuration out
                reasons = sorted({s["reason"] for s in skipped})
                why = f"no trial ran: {len(skipped)} configurations skipped ({'; '.join(reasons)})"
            raise InputError(f"quantization search made no successful trial ({why}); widen the search space"
                             + (" or raise --max-size-mb" if any("max_size" in s["reason"] for s in skipped) else ""))
        if passing:
            chosen = min(passing, key=lambda t: (not t.plain_transformers, t.size_bytes, t.degradation))
        else:
            chosen = min(measured, key=lambda t: (t.degradation, t.size_bytes))
            print(f"warning: no configuration met the target +{target_degradation:.1%} within the bounds "
                  f"({stop_reason}); writing the best one (trial {chosen.index}, {chosen.degradation:+.2%}), "
                  "which the release gate will reject", file=sys.stderr)
        search = {
            "target_degradation": target_degradation,
            "passed": bool(passing),
            "message": (f"trial {chosen.index} meets the target: {chosen.degradation:+.2%} at "
                        f"{chosen.size_bytes / 1e6:.1f} MB" if passing else
                        f"NO configuration met +{target_degradation:.1%} within the bounds; best was trial "
                        f"{chosen.index} at {chosen.degradation:+.2%} (written so the gate can reject it)"),
            "chosen_trial": chosen.index,
            "stop_reason": stop_reason,
            "baseline": {"model": str(src), "ppl": base.ppl, "tokens": base.tokens, "method": base.method},
            "baselines": {name: {"ppl": b.ppl, "tokens": b.tokens} for name, b in baselines.items()},
            "calibration_general": calib_kw,
            "space": asdict(space),
            "bounds": asdict(bounds),
            "calibration": str(calib),
            "sensitivity": sensitivity,
            "skipped": skipped,
            "wall_time_s": round(time.perf_counter() - started, 2),
            "trials": [asdict(t) for t in trials],
        }
        src_folder = root / f"trial-{chosen.index:02d}"
        with atomic_dir(output, force=force) as tmp:
            for item in src_folder.iterdir():
                os.replace(item, tmp / item.name)
            from lorakit.io.atomic import read_json

            meta = read_json(tmp / QUANT_META, "quantization record")
            meta["search"] = search
            write_json(tmp / QUANT_META, meta)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return QuantResult(output, chosen.params["method"], chosen.params["bits"], chosen.params["group_size"], meta)


def _label(p: dict) -> str:
    extra = f" +{len(p['module_bits'])} modules@{next(iter(p['module_bits'].values()))}b" if p["module_bits"] else ""
    return (f"{p['method']} {p['bits']}b g{p['group_size']} {'sym' if p['sym'] else 'asym'}"
            f"{' act-order' if p['desc_act'] else ''} n{p['n_samples'] or 'auto'}{extra}")


def reproduce_trial(model_dir, output, trial: dict, *, calib, device: str = "auto", progress: bool = False):
    """Re-run one recorded trial (``search.trials[i]``) from its parameters alone."""
    from lorakit.quantize.core import quantize_model

    return quantize_model(model_dir, output, calib=calib, device=device, progress=progress, **trial["params"])


# quantize_model arguments the search honours when it replaces a fixed configuration (quantize_to_target).
SEARCH_HONOURS = frozenset({"calib", "method", "bits", "group_size", "sym", "desc_act", "n_samples", "seq_len", "seed",
                            "device", "compute_dtype", "force", "progress", "calib_general",
                            "calib_general_fraction", "awq_scale_form", "gptaq_alpha", "clip_search", "keep_sensitive",
                            "eval_general",
                            "eval_general_max_tokens", *TUNE_KEYS})


def configured_space(params: dict[str, Any]) -> SearchSpace:
    """The search space that starts from a configured quantization instead of replacing it.

    Only the configured method and bits; the configured group size first, then only finer ones (more precise,
    larger files), so the first trial is the configured configuration itself; the configured sym and act-order
    choices tried before their alternatives within a size tier. Per-module precision (phase 2) as usual.
    """
    method = params.get("method", QUANTIZE.method)
    group = int(params.get("group_size", QUANTIZE.group_size))
    sym, act = resolve_grid(method, params.get("sym", QUANTIZE.sym), params.get("desc_act", QUANTIZE.desc_act))
    return SearchSpace(methods=(method,), group_sizes=(group,) + tuple(g for g in SearchSpace.group_sizes if g < group),
                       sym=(sym, not sym), desc_act=(act, not act), n_samples=(params.get("n_samples"),),
                       bits=int(params.get("bits", QUANTIZE.bits)))


def quantize_to_target(
    model_dir: str | os.PathLike[str] | None,
    output: str | os.PathLike[str],
    *,
    target_degradation: float | None = None,
    max_trials: int = SearchBounds.max_trials,
    time_budget_s: float = SearchBounds.time_budget_s,
    **params: Any,
):
    """The pipeline's one quantization entry point: the fixed configuration in ``params``, or, when
    ``target_degradation`` is set, the bounded search (calibrating and scoring on ``params['calib']``) starting
    from that configuration (:func:`configured_space`). A setting the search cannot honour is refused, never
    dropped."""
    from lorakit.quantize.core import quantize_model

    if target_degradation is None:  # the fixed configuration: nothing to score
        params = {k: v for k, v in params.items() if k not in ("eval_general", "eval_general_max_tokens")}
        return quantize_model(model_dir, output, **params)
    ignored = sorted(set(params) - SEARCH_HONOURS)
    if ignored:
        raise InputError(f"quantize setting(s) {', '.join(ignored)} cannot be combined with target_degradation (the "
                         "search chooses those itself); remove them, or drop target_degradation to use them as set")
    if params.get("method", QUANTIZE.method) not in METHODS:
        raise InputError(f"quantize method {params.get('method')!r} is not supported; choose from {', '.join(METHODS)}")
    return search_quantization(
        model_dir, output, calib=params["calib"], target_degradation=target_degradation,
        space=configured_space(params),
        bounds=SearchBounds(max_trials=max_trials, time_budget_s=time_budget_s),
        seq_len=int(params.get("seq_len", QUANTIZE.seq_len)), seed=int(params.get("seed", QUANTIZE.seed)),
        eval_general=params.get("eval_general"), eval_general_max_tokens=params.get("eval_general_max_tokens"),
        calib_general=params.get("calib_general", QUANTIZE.calib_general),
        calib_general_fraction=float(params.get("calib_general_fraction", QUANTIZE.calib_general_fraction)),
        awq_scale_form=params.get("awq_scale_form", QUANTIZE.awq_scale_form),
        gptaq_alpha=params.get("gptaq_alpha", QUANTIZE.gptaq_alpha),
        clip_search=bool(params.get("clip_search", QUANTIZE.clip_search)),
        keep_sensitive=int(params.get("keep_sensitive", QUANTIZE.keep_sensitive)),
        **{key: params.get(key, getattr(QUANTIZE, key)) for key in TUNE_KEYS},
        device=params.get("device", QUANTIZE.device), compute_dtype=params.get("compute_dtype", "auto"),
        force=bool(params.get("force", False)),
        progress=bool(params.get("progress", True)),
    )
