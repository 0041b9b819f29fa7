"""The release run configuration: one typed object that a YAML file, the CLI and the Prefect flow all share.

Each top-level field of :class:`ReleaseConfig` is one parameter of the ``release`` flow (same name, same type,
same default), so a config file, a deployment's parameters and a direct call describe a run the same way and
Prefect validates and displays them with the same schema. This module is Prefect-free so that reading a config
never starts an orchestration client.

Paths in a config (data files, base model folder, output and registry folders) are used as written: relative
paths are relative to the working directory of the process that runs the flow, as on the command line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, FiniteFloat, ValidationError, field_validator, model_validator

from lorakit.data.bundled import BUNDLED_NAMES, BUNDLED_TRAINING
from lorakit.data.options import PrepOptions
from lorakit.errors import InputError
from lorakit.export.types import GGUF_TYPES
from lorakit.gate.options import GateOptions
from lorakit.merge.options import MergeOptions, MergeSearchOptions, MethodName, default_weights
from lorakit.options import StageOptions
from lorakit.quantize.options import QuantizeOptions
from lorakit.scorecard.options import ScorecardOptions
from lorakit.train.options import TrainOptions

# The instruction tasks bundled with lorakit (made by its own deterministic generators), so the embedded
# default release runs with no network.
DEFAULT_DATASETS = BUNDLED_NAMES
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(v: str) -> str:
    """Dataset and registry names become folder and artifact names: keep them path-safe."""
    if not _NAME.match(v):
        raise ValueError("use letters, digits, '.', '_' or '-' (at most 64), starting with a letter or digit")
    return v


class _Section(StageOptions):
    """A section that is not one stage's options (those are the stages' own models, lorakit.options): unknown keys
    are refused, so a misspelt option fails loudly instead of silently falling back to its default."""


# What one dataset may set for its own adapter (``datasets[i].lora``): how long and how hard it trains. Tasks differ
# there (number-words needs lr 2e-3 where reverse-words at 1e-3 already forgets more general English:
# bench/results/train_sweep.json). What the merge and the training pool rely on (quantization, variant, init,
# target modules and layers, rank, device) stays the run's, one value for every adapter.
PER_DATASET_LORA_KEYS = ("lr", "epochs", "max_steps", "warmup_ratio", "weight_decay", "lora_plus_ratio", "batch_size",
                         "grad_accum", "seed")


class DatasetConfig(PrepOptions):
    """One task: its data (a bundled dataset or local files), how ``prepare_dataset`` renders it (the keys of
    ``lorakit prep``, :class:`lorakit.data.options.PrepOptions`), and what its adapter trains with beyond the run's
    ``lora:`` section (``lora``)."""

    name: str = Field(description="Task name; names the prepared data, the adapter and their registry entries.")
    bundled: Literal[BUNDLED_NAMES] | None = Field(  # type: ignore[valid-type]
        None, description="Name of a dataset bundled with lorakit (instead of files).")
    files: list[str] = Field(default_factory=list, description="Local data files (JSONL, JSON, CSV, Parquet, text).")

    merge_weight: FiniteFloat | None = Field(
        None, description="This task's adapter's weight in the merge when merge.weights is not given; null = "
        f"{default_weights(1)[0]:g}, or chosen by the merge search. A weight on any dataset is a weight given: the "
        "search (merge.search auto) is then off.")
    lora: dict[str, Any] = Field(
        default_factory=dict, description="This task's adapter trains with these options instead of the run's "
        f"lora: values (e.g. {{lr: 0.002}}); keys: {', '.join(PER_DATASET_LORA_KEYS)}.")

    _safe_name = field_validator("name")(check_name)

    def prep_params(self) -> dict[str, Any]:
        """The options ``prepare_dataset`` takes (the keys of ``lorakit prep``): what the other fields say about
        the task's adapter and merge does not change its prepared data."""
        return self.model_dump(include=set(PrepOptions.model_fields))

    @field_validator("lora")
    @classmethod
    def _training_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        other = sorted(set(v) - set(PER_DATASET_LORA_KEYS))
        if other:
            raise ValueError(f"{', '.join(other)} cannot differ between adapters; a dataset's lora: takes "
                             f"{', '.join(PER_DATASET_LORA_KEYS)} (set the rest in the run's lora: section)")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> DatasetConfig:
        if (self.bundled is None) == (not self.files):
            raise ValueError("give exactly one of 'bundled' (a bundled dataset name) or 'files' (a list of paths)")
        return self


class LoraConfig(TrainOptions):
    """QLoRA training (the keys and defaults of ``lorakit train``, :class:`lorakit.train.options.TrainOptions`),
    passed unchanged to ``lorakit.train.train_adapter``."""


class MergeSearchConfig(MergeSearchOptions):
    """Merge weights chosen by measurement (``lorakit merge --search``, :class:`lorakit.merge.options.MergeSearchOptions`):
    the search maximises the worst task's retention on val (of NLL, or of exact match with ``objective: accuracy``)."""


class MergeConfig(MergeOptions):
    """How the task adapters are combined into the base weights (the keys of ``lorakit merge``,
    :class:`lorakit.merge.options.MergeOptions`; ``weights`` has one entry per dataset).

    The release merges with RegMean (``lorakit merge``'s own default stays linear, which needs no data): on the
    default release's 80-step adapters the searched linear weights kept at most 64% of both tasks' val exact match,
    RegMean over 90% (bench/results/merge_regmean.json; docs/merge.md)."""

    method: MethodName = Field("regmean", description="How updates are combined: regmean (the release's default) "
                               "fits each layer to keep every adapter's outputs on its own task's training inputs; "
                               "linear, ties, dare_* and magnitude_prune combine the full updates ΔWᵢ = scalingᵢ·BᵢAᵢ.")

    regmean_anchor: float | None = Field(
        1.0, ge=0, allow_inf_nan=False, description="regmean: weight of the general-text anchor (the release's "
        "default 1.0: the base's outputs on general English weigh as much as one task; lorakit merge's own default "
        "is off); null = 0.")

    search: MergeSearchConfig | Literal["auto"] | None = Field(
        "auto", description="Choose the weights on the tasks' val splits (lorakit merge --search): a mapping of "
        "search options (the methods searched default to 'method'; with regmean it weighs RegMean's projected "
        "updates; max_examples defaults to the val questions the gate judges, scorecard.judge_examples); auto = "
        "search with the defaults when it applies (no weights given, two or more plain LoRA adapters), else the "
        "weights; null = never, use 'weights'.")

    @field_validator("search", mode="before")
    @classmethod
    def _auto_null_or_options(cls, v: Any) -> Any:
        if isinstance(v, str) and v != "auto":
            raise ValueError(f"give auto, null or a mapping of search options (e.g. {{max_trials: 24}}), got {v!r}")
        return v

    @model_validator(mode="after")
    def _search_or_weights(self) -> MergeConfig:
        if isinstance(self.search, MergeSearchConfig) and self.weights is not None:
            raise ValueError("give 'weights' or 'search', not both: the search chooses the weights")
        if isinstance(self.search, MergeSearchConfig) and self.loftq_base is not None:
            raise ValueError("'search' merges plain LoRA adapters; it does not apply with loftq_base")
        return self


class QuantizeConfig(QuantizeOptions):
    """4-bit post-training quantization of the merged model (the keys and defaults of ``lorakit quantize``,
    :class:`lorakit.quantize.options.QuantizeOptions`: the measured release configuration, and why).

    The release tunes the rounded model's scales by default (``lorakit quantize``'s own default stays off: it
    costs minutes where a quick quantization is asked for). Why: GPTQ alone flipped enough of reverse-words'
    answers that the gate rejected half the releases measured; 100 steps of tuning on the tasks' data brought the
    rejected one's lost val points from 3.0 to 0.0 (bench/results/quantize_tuning_b1s240_seed0.json:
    rounded.accuracy.reverse-words.val.drop, variants.tune100-lr5e-04-general0.accuracy.reverse-words.val.drop;
    docs/release-status.md, "Scale tuning after rounding")."""

    tune_steps: int = Field(
        100, ge=0, description="After rounding, tune each group's scale and the norm weights this many steps by "
        "distillation from the merged model on the tasks' calibration data (codes, zero points and layout "
        "unchanged); kept only if it lowers the KL on held-out blocks. 0 = off (lorakit quantize's default).")
    calib_dataset: str | None = Field(
        None, description="Dataset whose train split calibrates; default: every dataset's data prepared together.")


class GateConfig(GateOptions):
    """The release gate (the keys and defaults of ``lorakit gate``, :class:`lorakit.gate.options.GateOptions`): the
    quantized model against the merged full-precision model, on every task's val split, on general text, and on
    the scorecard."""


class ScorecardConfig(ScorecardOptions):
    """The release scorecard (the keys of ``lorakit scorecard``, :class:`lorakit.scorecard.options.ScorecardOptions`)."""


class ExportConfig(_Section):
    """Extra release formats, each gated like the quantized model (``lorakit.export``)."""

    gguf: Literal[GGUF_TYPES] | None = Field(  # type: ignore[valid-type]
        None, description="Also write the merged model as a llama.cpp GGUF of this type, gate it and register it; "
        "null = off (sizes, times and perplexities per type: bench/README.md, ## export).")


class RegistryConfig(_Section):
    """Where and under which name the release artifacts are registered."""

    root: str | None = Field(None, description="Registry folder; default $LORAKIT_REGISTRY or under $LORAKIT_HOME.")
    name: str = "release"

    _safe_name = field_validator("name")(check_name)


class PoolsConfig(_Section):
    """Work pool names. GPU flows are deployed as ``<flow>/<cuda>``, the release flow as ``release/<cpu>``."""

    cpu: str = "cpu"
    cuda: str = "cuda"


class ReleaseConfig(_Section):
    """A whole release run. Every field is a parameter of the ``release`` flow."""

    base: str = Field("default", description="Base model: 'default' (embedded SmolLM2-135M-Instruct), a folder or hub id.")
    datasets: list[DatasetConfig] = Field(
        default_factory=lambda: [DatasetConfig(name=n, bundled=n, lora=dict(BUNDLED_TRAINING.get(n, {})))
                                 for n in DEFAULT_DATASETS], min_length=1
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    scorecard: ScorecardConfig = Field(default_factory=ScorecardConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    pools: PoolsConfig = Field(default_factory=PoolsConfig)
    route_gpu: bool = Field(False, description="Run training and quantization as deployments on the CUDA pool.")
    auto_promote: bool = Field(False, description="On a passed gate also move the 'production' alias.")
    train_concurrency: int | Literal["auto"] = Field(
        "auto", description="Adapters trained at once, each in its own process with its share of the cores: auto = "
        "one at a time on CUDA, else one per dataset up to the core count and what the available memory holds; 1 = "
        "one after another in the flow's process. With route_gpu every adapter is sent at once and the pool's limits "
        "decide.")
    output_dir: str = Field("lorakit-out", description="Folder that holds every stage's output.")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of training, quantization and the gate (lorakit.compute): auto = bfloat16 only "
        "where it is fast for training/quantization, float32 for the gate; the merge is always float32.")

    @field_validator("train_concurrency")
    @classmethod
    def _at_least_one(cls, v: int | str) -> int | str:
        if v != "auto" and int(v) < 1:
            raise ValueError("give 'auto' or a number of adapters >= 1")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ReleaseConfig:
        names = [d.name for d in self.datasets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"dataset names must be unique; repeated: {', '.join(dupes)}")
        if self.merge.weights is not None and len(self.merge.weights) != len(self.datasets):
            raise ValueError(weights_count_problem(len(self.merge.weights), len(self.datasets)))
        if self.quantize.calib_dataset is not None and self.quantize.calib_dataset not in names:
            raise ValueError(f"quantize.calib_dataset {self.quantize.calib_dataset!r} is not one of the datasets ({', '.join(names)})")
        for i, ds in enumerate(self.datasets):
            try:
                self.lora_for(ds)
            except ValidationError as exc:
                raise ValueError(f"datasets.{i}.lora ({ds.name}): "
                                 + "; ".join(describe_error(e) for e in exc.errors())) from None
        if (self.lora.init == "loftq") != (self.merge.loftq_base is not None):
            raise ValueError("lora.init 'loftq' and merge.loftq_base go together: LoftQ adapters belong to the NF4 base, "
                             "so set merge.loftq_base (dequantized = exactly what was trained), and only with loftq")
        return self

    def lora_for(self, ds: DatasetConfig) -> LoraConfig:
        """The training options of ``ds``'s adapter: the run's ``lora:`` with the dataset's own ``lora:`` over it."""
        return LoraConfig(**{**self.lora.model_dump(), **ds.lora}) if ds.lora else self.lora

    def merge_search(self) -> MergeSearchConfig | None:
        """The search the merge runs, None for fixed weights. ``auto`` searches where the search applies and has a
        choice to make: no weights given (neither ``merge.weights`` nor any dataset's ``merge_weight``), two or more
        datasets (one adapter alone is best at weight 1.0), and plain LoRA adapters (a DoRA or LoftQ update depends
        on the base weights; the search refuses those). The search weighs the merge's own ``method`` unless
        ``methods`` is given: with regmean (the release's method) it chooses the weights of RegMean's projected
        updates. Unless ``max_examples`` is given it scores the val questions the gate's retention check judges
        (``scorecard.judge_examples``), so the weights are chosen on what the release is judged by.

        Why RegMean searches by default: fixed weights of 1.3, measured on 120-step adapters, cost the 240-step
        seed-0 adapters' merged model a tenth of reverse-words' test answers (84.0%, against 94.0% for the adapter:
        bench/results/release_scorecard_bf16_b1s240.json, release.all_test.reverse-words); the searched weights kept
        at least 0.98 of each adapter's val exact match on both seeds measured
        (bench/results/release_scorecard_bf16_b1s240_search_seed{0,1}.json: release.merge.search.report.val.chosen;
        docs/release-status.md, "RegMean's weights chosen on val")."""
        s = self.merge.search
        if s == "auto":
            plain = self.lora.variant == "lora" and self.lora.init != "loftq"
            given = self.merge.weights is not None or any(ds.merge_weight is not None for ds in self.datasets)
            s = MergeSearchConfig() if not given and len(self.datasets) > 1 and plain else None
        if s is None:
            return None
        update: dict[str, Any] = {}
        if "methods" not in s.model_fields_set:
            update["methods"] = [self.merge.method]
        if "max_examples" not in s.model_fields_set:
            update["max_examples"] = self.scorecard.judge_examples
        return s.model_copy(update=update)

    def merges_with_regmean(self) -> bool:
        """Whether the merge stage runs RegMean's fit: as the merge's method, or among the methods its search tries
        (either way it reads every dataset's train split and holds the Gram matrices)."""
        search = self.merge_search()
        return self.merge.method == "regmean" or (search is not None and "regmean" in search.methods)

    def merge_weights(self) -> list[float]:
        """The weights given, else each dataset's ``merge_weight`` (1.0 unless set: why, at
        :func:`lorakit.merge.options.default_weights`)."""
        if self.merge.weights is not None:
            return list(self.merge.weights)
        unset = default_weights(1)[0]
        return [unset if ds.merge_weight is None else float(ds.merge_weight) for ds in self.datasets]

    def calib_dataset(self) -> str | None:
        """The one dataset that calibrates quantization; None = all of them, prepared together."""
        if self.quantize.calib_dataset is None and len(self.datasets) == 1:
            return self.datasets[0].name
        return self.quantize.calib_dataset

    def flow_parameters(self) -> dict[str, Any]:
        """The keyword arguments of the ``release`` flow (typed sections kept as objects)."""
        return {name: getattr(self, name) for name in type(self).model_fields}


def weights_count_problem(n_weights: int, n_datasets: int) -> str:
    """The one wording of a merge-weight count mismatch (the schema and the preflight say it the same way)."""
    return (f"merge.weights has {n_weights} value(s) for {n_datasets} dataset(s); "
            "give one weight per dataset, in order")


def describe_error(error: dict[str, Any]) -> str:
    """One pydantic error as one line naming the key (``'merge.weights.0': Input should be a finite number``)."""
    where = ".".join(str(p) for p in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"unknown key '{where}'"
    if error["type"] == "missing":
        return f"missing key '{where}'"
    msg = error["msg"].removeprefix("Value error, ")
    return f"'{where}': {msg}" if error["loc"] else msg


def config_error(source: str, exc: ValidationError) -> InputError:
    """One actionable line per problem, naming the key (``datasets.0.fromat``) and the file."""
    problems = "; ".join(describe_error(e) for e in exc.errors())
    return InputError(f"{source}: {problems}. Fix the file (keys and defaults: docs/pipeline.md, 'The run config').")


def parse_config(data: Any, source: str = "config") -> ReleaseConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"{source}: the top level must be a mapping of keys (base:, datasets:, ...), got {type(data).__name__}")
    try:
        return ReleaseConfig.model_validate(data)
    except ValidationError as exc:
        raise config_error(source, exc) from None


def load_config(path: str | os.PathLike[str]) -> ReleaseConfig:
    """Read and validate a YAML run config; any problem is an :class:`InputError` naming the file and key."""
    return parse_config(read_config_data(path), str(path))


def read_config_data(path: str | os.PathLike[str]) -> Any:
    """The YAML of a run config, parsed but not validated (:mod:`flows.preflight` validates it key by key)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"config file {path} does not exist; pass a YAML run config such as configs/default.yaml") from None
    except IsADirectoryError:
        raise InputError(f"config {path} is a folder; pass a YAML run config file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise InputError(f"{path}{where} is not valid YAML ({getattr(exc, 'problem', exc)}); fix the syntax") from None
    return data


def dump_config(config: ReleaseConfig) -> str:
    """The config as YAML with every default spelled out (what ``load_config`` reads back unchanged)."""
    import yaml

    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
