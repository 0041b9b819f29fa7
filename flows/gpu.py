"""The GPU stages (training, quantization) as flows of their own, so they can run on a CUDA work pool.

Prefect routes whole flow runs, not tasks, to work pools: a stage that needs a GPU therefore is a flow,
deployed on the ``cuda`` pool (``prefect.yaml``) and called from the release flow through
``run_deployment(..., as_subflow=True)``. The child returns its output path and metadata as a persisted result
that the parent reads back, so both sides must reach the same result storage (``lorakit pools up`` saves a
LocalFileSystem block for one machine; use a shared filesystem or S3 block across machines). With routing off the
same flows run in-process as ordinary subflows: one code path, two placements.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.deployments import run_deployment

from lorakit.errors import InputError, LorakitError
from tasks import stages


@flow(name="train", persist_result=True)
def train_flow(prep_dir: str, output: str, params: dict[str, Any], process_threads: int | None = None
               ) -> dict[str, Any]:
    """Train one LoRA adapter on one prepared data set (``process_threads``: in a child process with that many
    torch threads, so that several train at once; None = in this process)."""
    return stages.run_fresh(stages.train_adapter, prep_dir, output, params, process_threads=process_threads)


@flow(name="quantize", persist_result=True)
def quantize_flow(model_dir: str, output: str, params: dict[str, Any]) -> dict[str, Any]:
    """Quantize a full-precision model folder to GPTQ/AWQ."""
    return stages.run_fresh(stages.quantize_model, model_dir, output, params)


def deployment_name(gpu_flow, pool: str) -> str:
    """GPU deployments are named after the pool they run on: ``train/cuda``, ``quantize/cuda``."""
    return f"{gpu_flow.name}/{pool}"


def run_gpu(gpu_flow, *, route: bool, pool: str, **parameters: Any) -> dict[str, Any]:
    """Run a GPU flow in-process, or as a subflow run of its deployment on the CUDA pool."""
    if not route:
        return gpu_flow(**parameters)
    from prefect.exceptions import ObjectNotFound

    name = deployment_name(gpu_flow, pool)
    try:
        run = run_deployment(name=name, parameters=parameters, as_subflow=True)
    except ObjectNotFound:
        raise InputError(
            f"route_gpu is on but the Prefect server has no deployment {name}; run scripts/pools_up.sh and "
            "`prefect --no-prompt deploy --all` against it (PREFECT_API_URL), or set route_gpu: false"
        ) from None
    if run.state is None or not run.state.is_completed():
        state = run.state.name if run.state else "no state"
        raise LorakitError(
            f"GPU flow run {run.name} ({deployment_name(gpu_flow, pool)}) ended {state}: "
            f"{run.state.message if run.state else ''}; see `prefect flow-run logs {run.id}`",
            exit_code=1,
        )
    return run.state.result()
