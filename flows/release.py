"""The release pipeline: task data -> adapters -> merged model -> quantized model -> gate -> registry.

The flow's parameters are exactly the fields of :class:`flows.config.ReleaseConfig` (a YAML run config, a
deployment's parameters and a direct call are the same thing). Where each stage writes comes from
:mod:`flows.plan`; training and quantization run through :func:`flows.gpu.run_gpu` (in-process, or on the CUDA
pool when ``route_gpu``). A rejected release still registers everything, then ends the run Failed with the verdict.
"""

from __future__ import annotations

import time

from prefect import flow
from prefect.states import Failed

from flows import report
from flows.config import (DatasetConfig, GateConfig, LoraConfig, MergeConfig, PoolsConfig, QuantizeConfig,
                          RegistryConfig, ReleaseConfig)
from flows.gpu import quantize_flow, run_gpu, train_flow
from flows.lineage import move_aliases, register_release
from flows.plan import ReleasePlan
from tasks import stages

_D = ReleaseConfig()  # the defaults, shared with the config file reader


@flow(name="release", persist_result=True)
def release(base: str = _D.base, datasets: list[DatasetConfig] = _D.datasets, lora: LoraConfig = _D.lora,
            merge: MergeConfig = _D.merge, quantize: QuantizeConfig = _D.quantize, gate: GateConfig = _D.gate,
            registry: RegistryConfig = _D.registry, pools: PoolsConfig = _D.pools, route_gpu: bool = _D.route_gpu,
            auto_promote: bool = _D.auto_promote, output_dir: str = _D.output_dir,
            compute_dtype: str = _D.compute_dtype):
    """Build, gate and register one release model from a base model and task data sets."""
    started = time.perf_counter()
    cfg = ReleaseConfig(base=base, datasets=datasets, lora=lora, merge=merge, quantize=quantize, gate=gate,
                        registry=registry, pools=pools, route_gpu=route_gpu, auto_promote=auto_promote,
                        output_dir=output_dir, compute_dtype=compute_dtype)
    plan, on_gpu = ReleasePlan(cfg), {"route": cfg.route_gpu, "pool": cfg.pools.cuda}

    preps, adapters = {}, {}
    for ds in cfg.datasets:
        preps[ds.name] = stages.run_fresh(stages.prep_data, **plan.prep(ds))
        adapters[ds.name] = run_gpu(train_flow, **on_gpu, **plan.train(ds, preps[ds.name]["path"]))
    merged = stages.run_fresh(stages.merge_adapters,
                               **plan.merge([adapters[ds.name]["path"] for ds in cfg.datasets]))
    calib = preps[cfg.calib_dataset()] if cfg.calib_dataset() else stages.run_fresh(stages.prep_data, **plan.calibration())
    quantized = run_gpu(quantize_flow, **on_gpu, **plan.quantize(merged["path"], calib["path"]))
    verdict = stages.run_fresh(stages.gate, **plan.gate(merged["path"], quantized["path"], {n: p["path"] for n, p in preps.items()}))

    refs = register_release(cfg, preps, adapters, merged, quantized, verdict)
    passed = verdict["metadata"]["passed"]
    aliases = move_aliases(cfg, refs["quantized"]) if passed else []
    rows = report.stage_rows(cfg, preps, adapters, merged, quantized, verdict, refs)
    report.publish(cfg, rows, verdict, aliases, time.perf_counter() - started)

    summary = report.verdict_line(verdict["metadata"], cfg.gate.max_degradation)
    if not passed:
        return Failed(message=f"{summary}; rejected artifacts registered as {refs['quantized']} (gate:failed)")
    return {"passed": True, "summary": summary, "refs": refs, "aliases": aliases, "release": quantized["path"]}
