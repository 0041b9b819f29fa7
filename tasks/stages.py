"""One Prefect task per release stage, each a thin wrapper over the lorakit library function of that stage.

What the wrappers add is only what Prefect needs: a cache key (:data:`tasks.cache.STAGE_CACHE`), persisted
results, retries where a retry can help, the ``gpu`` tag that the GPU-slot concurrency limit counts, and a
plain return value (the output path and the small metadata dict the stage wrote beside its files) so no tensor
ever crosses a task boundary. Stage outputs are owned by the pipeline (``flows.plan`` gives every distinct set of
arguments its own folder), so a step that runs again replaces its own folder: ``force=True``. Library imports
stay inside the tasks: importing this module must not pull in torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from lorakit.errors import LorakitError
from tasks.cache import STAGE_CACHE, placement_blind_cache
from tasks.progress import reported, stage_lines

GPU_TAG = "gpu"


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry transient failures (a lost GPU, a busy database); an InputError will fail the same way again."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return not isinstance(exc, LorakitError)


# Stage task name -> the word its progress lines start with; the item comes from the output folder's label.
_STAGE_WORDS = {"prep-data": "prep", "train-adapter": "train", "merge-adapters": "merge",
                "quantize-model": "quantize", "scorecard": "scorecard", "gate": "gate"}
_UNNAMED_ITEMS = {"model", "verdict", "card"}  # the one merged model, the one verdict: the stage word says it all


def stage_label(stage, args: tuple, kwargs: dict[str, Any]) -> str:
    """``train reverse-words``, ``quantize gptq``, ``merge``: the name a stage's progress lines carry."""
    import inspect

    word = _STAGE_WORDS.get(stage.name, stage.name)
    try:
        output = inspect.signature(stage.fn).bind_partial(*args, **kwargs).arguments.get("output")
    except TypeError:
        output = None
    if not output:
        return word
    item = Path(str(output)).name.rsplit("-", 1)[0]  # plan.stage_dir: <label>-<key>
    return word if item in _UNNAMED_ITEMS else f"{word} {item}"


def _detail(result: dict[str, Any]) -> str:
    meta = result.get("metadata") or {}
    if isinstance(meta.get("first_loss"), (int, float)) and isinstance(meta.get("final_loss"), (int, float)):
        return f"loss {meta['first_loss']:.2f} -> {meta['final_loss']:.2f}"
    if isinstance(meta.get("passed"), bool) and isinstance(meta.get("degradation"), (int, float)):
        return f"{'pass' if meta['passed'] else 'REJECT'}, degradation {meta['degradation']:+.2%}"
    if isinstance(meta.get("tasks"), dict) and "task_order" in meta:  # a scorecard
        from lorakit.scorecard.report import summary_line

        return summary_line(meta)
    return ""


def run_fresh(stage, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Call a cached stage task; a cache hit whose output folder was deleted since is recomputed.

    The cache key covers code, arguments and input files, not the step's own output (stamping it would change the
    key as soon as the first run wrote it), so a hit can point at a folder someone removed by hand. Re-running
    with ``refresh_cache`` rebuilds it instead of handing a dangling path to the next stage. Prints (and logs to
    Prefect) a start and a finish line with the elapsed time, and says when the result came from the cache.
    """
    with stage_lines(stage_label(stage, args, kwargs)) as info:
        state = stage(*args, return_state=True, **kwargs)
        result = state.result()
        if not Path(result["path"]).exists():
            state = stage.with_options(refresh_cache=True)(*args, return_state=True, **kwargs)
            result = state.result()
        if state.name == "Cached":
            info["outcome"] = "cached (inputs and code unchanged since an earlier run)"
        info["detail"] = _detail(result)
    return result


def _stage(**options: Any):
    return task(cache_policy=STAGE_CACHE, persist_result=True, **options)


def _out(result: Any) -> dict[str, Any]:
    return {"path": str(Path(result.output).absolute()), "metadata": result.metadata}


@_stage(name="prep-data")
@reported
def prep_data(sources: list[str], output: str, params: dict[str, Any]) -> dict[str, Any]:
    """Tokenize and split one task's data (``lorakit.data.prep.prepare_dataset``)."""
    from lorakit.data.prep import prepare_dataset

    return _out(prepare_dataset(sources, output, force=True, progress=True, **params))


@task(cache_policy=placement_blind_cache("process_threads"), persist_result=True, name="train-adapter", tags=[GPU_TAG],
      retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unless_bad_input)
@reported
def train_adapter(prep_dir: str, output: str, params: dict[str, Any], process_threads: int | None = None
                  ) -> dict[str, Any]:
    """QLoRA-train one adapter (``lorakit.train.train_adapter``); a retry resumes from the last checkpoint.

    ``process_threads``: train in a child process of its own with that many torch threads
    (``lorakit.train.train_in_child``: how several adapters train at once); None = in this process. Where it
    trains does not change what it trains, so it is not part of the cache key.
    """
    from prefect.runtime import task_run

    retrying = (task_run.run_count or 0) > 1  # checkpoints carry a fingerprint: only the same run is resumed
    options = {"resume": retrying, "force": True, "progress": True, **params}
    if process_threads is None:
        from lorakit.train import train_adapter as train

        return _out(train(prep_dir, output, **options))
    from lorakit.train import train_in_child

    label = stage_label(train_adapter, (), {"output": output})
    return _out(train_in_child(prep_dir, output, threads=process_threads, label=label, **options))


@_stage(name="merge-adapters")
@reported
def merge_adapters(adapters: list[str], weights: list[float] | None, output: str,
                   params: dict[str, Any]) -> dict[str, Any]:
    """Fold the weighted adapters into the base weights (``lorakit.merge.merge_adapters``); with ``search`` in
    ``params``, the weights are chosen on the tasks' val splits first (``lorakit.merge.search.search_merge``)."""
    if params.get("search") is not None:
        from lorakit.merge.search import search_merge

        rest = {k: v for k, v in params.items() if k not in ("search", "method")}
        s = dict(params["search"])
        return _out(search_merge(adapters, s.pop("data"), output, force=True, progress=True, **s, **rest))
    from lorakit.merge import merge_adapters as merge

    return _out(merge(adapters, weights, output, force=True, progress=True, **params))


@_stage(name="quantize-model", tags=[GPU_TAG], retries=1, retry_delay_seconds=10,
        retry_condition_fn=retry_unless_bad_input)
@reported
def quantize_model(model_dir: str, output: str, params: dict[str, Any]) -> dict[str, Any]:
    """GPTQ/AWQ-quantize a model folder: the fixed configuration, or the search when ``target_degradation`` is set
    (``lorakit.quantize.search.quantize_to_target``)."""
    from lorakit.quantize.search import quantize_to_target as quantize

    return _out(quantize(model_dir, output, force=True, progress=True, **params))


@_stage(name="export-gguf")
def export_gguf(model_dir: str, output: str, params: dict[str, Any]) -> dict[str, Any]:
    """Write a full-precision model folder as a llama.cpp GGUF file in a folder (``lorakit.export.export_gguf_folder``)."""
    from lorakit.export import export_gguf_folder

    return _out(export_gguf_folder(model_dir, output, force=True, progress=False, **params))


@_stage(name="evaluate")
@reported
def evaluate(model: str, data: str, params: dict[str, Any]) -> dict[str, Any]:
    """Perplexity of one model on one data set (``lorakit.evaluate.perplexity``)."""
    from lorakit.evaluate import perplexity

    result = perplexity(model, data, progress=True, **params)
    return {"ppl": result.ppl, "nll_sum": result.nll_sum, "tokens": result.tokens, "method": result.method,
            "path_used": result.path_used}


@_stage(name="scorecard")
@reported
def scorecard(base: str, tasks: list[list[str]], merged: str, quantized: str, output: str,
              params: dict[str, Any]) -> dict[str, Any]:
    """Task accuracy and perplexity of base, each task's adapter, merged and quantized on every task
    (``lorakit.scorecard.build_scorecard``); ``tasks`` are ``[name, prep folder, adapter]`` lists."""
    from lorakit.scorecard import ScorecardTask, build_scorecard

    specs = [ScorecardTask(*t) for t in tasks]
    return _out(build_scorecard(base, specs, merged, quantized, output=output, force=True, progress=True, **params))


@_stage(name="gate")
@reported
def gate(baseline: str, candidate: str, data: str, extra_checks: list[dict[str, Any]], output: str,
         params: dict[str, Any]) -> dict[str, Any]:
    """The perplexity gate (``lorakit.gate.check``): returns the verdict, pass or fail, without raising.

    ``extra_checks`` are ``CheckSpec`` fields as plain dicts (task inputs must be serialisable to be cached).
    """
    from lorakit.gate import CheckSpec, check

    specs = [CheckSpec(**spec) for spec in extra_checks]
    verdict = check(baseline, candidate, data, extra_checks=specs, output=output, force=True, progress=True, **params)
    return _out(verdict)


@_stage(name="register", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_unless_bad_input)
def register(path: str, root: str | None, name: str, kind: str, metrics: dict[str, float],
             params: dict[str, Any], parents: list[str | list], tags: list[str],
             metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Register one artifact with its lineage (``registry.Registry.register``); idempotent for equal content.

    ``metadata``: documents kept with the version beside the stage JSONs found in its folder (the release's
    scorecard). A parent is a reference, or ``[reference, edge_params]`` (a list, because task results round-trip as JSON-like
    data; the registry takes a tuple).
    """
    from registry import Registry

    edges = [p if isinstance(p, str) else (p[0], p[1]) for p in parents]
    v = Registry(root).register(path, name=name, kind=kind, metrics=metrics, params=params, parents=edges, tags=tags,
                                metadata=metadata)
    return {"ref": v.ref, "name": v.name, "version": v.version, "digest": v.digest,
            "verdict": v.verdict["passed"] if v.verdict else None}


@task(name="set-alias", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_unless_bad_input)
def set_alias(root: str | None, ref: str, alias: str) -> str:
    """Point ``name@alias`` at a version (``candidate`` after a passed gate; ``production`` via promote).

    Never cached: an alias move is an action on the registry's current state, not a derivation from inputs.
    """
    from registry import Registry

    reg = Registry(root)
    if alias == "production":
        reg.promote(ref)
    else:
        reg.set_alias(ref, alias)
    return f"{ref.split('@')[0]}@{alias}"
