"""The release pipeline: task data -> adapters -> merged model -> quantized model -> scorecard -> gate -> registry.

The scorecard scores the base, each task's adapter, the merged and the quantized model on every task (accuracy
and perplexity, val and test); the gate judges perplexity and the scorecard's retention and accuracy drop (val).

With ``export.gguf`` set, the merged model is also written as a llama.cpp GGUF file, gated against the merged
model like the quantized one, and registered; the release then passes only when both gates pass.

The flow's parameters are exactly the fields of :class:`flows.config.ReleaseConfig` (a YAML run config, a
deployment's parameters and a direct call are the same thing). Where each stage writes comes from
:mod:`flows.plan`; training and quantization run through :func:`flows.gpu.run_gpu` (in-process, or on the CUDA
pool when ``route_gpu``). The adapters train side by side (:func:`train_adapters`: each in a child process with
its share of the cores, docs/pipeline.md "Adapters train at once"). A rejected release still registers everything,
then ends the run Failed with the verdict.
"""

from __future__ import annotations

import time

from prefect import flow
from prefect.states import Failed

from flows import report
from flows.config import (DatasetConfig, ExportConfig, GateConfig, LoraConfig, MergeConfig, PoolsConfig,
                          QuantizeConfig, RegistryConfig, ReleaseConfig, ScorecardConfig)
from flows.gpu import quantize_flow, run_gpu, train_flow
from flows.lineage import move_aliases, register_release
from flows.parallel import run_concurrently
from flows.plan import ReleasePlan
from tasks import stages
from tasks.progress import say, stage_lines

_D = ReleaseConfig()  # the defaults, shared with the config file reader


@flow(name="release", persist_result=True)
def release(base: str = _D.base, datasets: list[DatasetConfig] = _D.datasets, lora: LoraConfig = _D.lora,
            merge: MergeConfig = _D.merge, quantize: QuantizeConfig = _D.quantize, gate: GateConfig = _D.gate,
            scorecard: ScorecardConfig = _D.scorecard, export: ExportConfig = _D.export, registry: RegistryConfig = _D.registry, pools: PoolsConfig = _D.pools,
            route_gpu: bool = _D.route_gpu, auto_promote: bool = _D.auto_promote,
            train_concurrency: int | str = _D.train_concurrency, output_dir: str = _D.output_dir,
            compute_dtype: str = _D.compute_dtype):
    """Build, gate and register one release model from a base model and task data sets."""
    started = time.perf_counter()
    cfg = ReleaseConfig(base=base, datasets=datasets, lora=lora, merge=merge, quantize=quantize, gate=gate,
                        scorecard=scorecard, export=export, registry=registry, pools=pools, route_gpu=route_gpu,
                        auto_promote=auto_promote, train_concurrency=train_concurrency, output_dir=output_dir,
                        compute_dtype=compute_dtype)
    plan, on_gpu = ReleasePlan(cfg), {"route": cfg.route_gpu, "pool": cfg.pools.cuda}

    # prep takes seconds and, in threads, would race transformers' lazy imports: in turn; training may overlap
    preps = {ds.name: stages.run_fresh(stages.prep_data, **plan.prep(ds)) for ds in cfg.datasets}
    adapters = train_adapters(cfg, plan, preps, on_gpu)
    merged = stages.run_fresh(stages.merge_adapters,
                               **plan.merge([adapters[ds.name]["path"] for ds in cfg.datasets],
                                            {n: p["path"] for n, p in preps.items()}))
    calib = preps[cfg.calib_dataset()] if cfg.calib_dataset() else stages.run_fresh(stages.prep_data, **plan.calibration())
    quantized = run_gpu(quantize_flow, **on_gpu, **plan.quantize(merged["path"], calib["path"]))
    checks = {n: p["path"] for n, p in preps.items()}
    card = stages.run_fresh(stages.scorecard, **plan.scorecard({n: a["path"] for n, a in adapters.items()},
                                                               merged["path"], quantized["path"], checks))
    verdict = stages.run_fresh(stages.gate, **plan.gate(merged["path"], quantized["path"], checks, card["path"]))
    gguf = gguf_verdict = None
    if cfg.export.gguf:
        gguf = stages.run_fresh(stages.export_gguf, **plan.export_gguf(merged["path"]))
        gguf_verdict = stages.run_fresh(stages.gate, **plan.gate(merged["path"], gguf["path"], checks))

    with stage_lines("register") as info:
        refs = register_release(cfg, preps, adapters, merged, quantized, verdict, gguf, gguf_verdict, card)
        passed = all(v["metadata"]["passed"] for v in (verdict, gguf_verdict) if v is not None)
        released = [refs[role] for role in ("quantized", "gguf") if role in refs]
        aliases = [alias for ref in released for alias in move_aliases(cfg, ref)] if passed else []
        info["detail"] = f"{len(refs)} artifacts" + (f", alias {', '.join(aliases)}" if aliases else "")
    rows = report.stage_rows(cfg, preps, adapters, merged, quantized, verdict, refs, gguf, gguf_verdict, card)
    report.publish(cfg, rows, verdict, aliases, time.perf_counter() - started, card)

    summary = report.verdict_line(verdict["metadata"], cfg.gate.max_degradation)
    if gguf_verdict is not None:
        summary += f"; GGUF {cfg.export.gguf} " + report.verdict_line(gguf_verdict["metadata"], cfg.gate.max_degradation)
    if not passed:
        rejected = [refs[role] for role, v in (("quantized", verdict), ("gguf", gguf_verdict))
                    if v is not None and not v["metadata"]["passed"]]
        return Failed(message=f"{summary}; rejected artifacts registered as {', '.join(rejected)} (gate:failed)")
    return {"passed": True, "summary": summary, "refs": refs, "aliases": aliases, "release": quantized["path"],
            "gguf": gguf["path"] if gguf else None}


def train_adapters(cfg: ReleaseConfig, plan: ReleasePlan, preps: dict[str, dict], on_gpu: dict) -> dict[str, dict]:
    """One adapter per dataset, as many at once as :func:`adapter_slots` allows; results by dataset name."""
    slots, threads = adapter_slots(cfg)
    placement = {} if threads is None else {"process_threads": threads}
    if threads is not None:  # the training code (torch, transformers) loads once, here, not in two threads at once
        import lorakit.train.child  # noqa: F401
    if slots > 1:
        where = f"each in its own process with {threads} torch thread(s)" if threads else "on the CUDA pool"
        say(f"train: {len(cfg.datasets)} adapters, {slots} at once, {where} (train_concurrency: {cfg.train_concurrency})")

    def train(ds: DatasetConfig) -> dict:
        return run_gpu(train_flow, **on_gpu, **plan.train(ds, preps[ds.name]["path"]), **placement)

    return dict(zip([ds.name for ds in cfg.datasets], run_concurrently(train, cfg.datasets, slots)))


def adapter_slots(cfg: ReleaseConfig) -> tuple[int, int | None]:
    """Adapters trained at once and each one's torch threads (:func:`lorakit.runtime.training_slots`, which also
    fits ``auto`` to the memory available for trainings of this base); routed to the CUDA pool, every adapter is sent
    at once and the pool's own limits (the ``gpu`` tag) queue them."""
    if cfg.route_gpu:
        return len(cfg.datasets), None
    from lorakit.models.folder import resolve_model_dir
    from lorakit.runtime import training_slots

    weights = sum(f.stat().st_size for f in resolve_model_dir(cfg.base).glob("*.safetensors"))
    return training_slots(cfg.train_concurrency, len(cfg.datasets), cfg.lora.device, base_weight_bytes=weights)
