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

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationError, field_validator, model_validator

from lorakit.errors import InputError
from lorakit.quantize.defaults import RELEASE_QUANTIZE
from lorakit.gate.general import DEFAULT_GENERAL_MAX_DEGRADATION, DEFAULT_GENERAL_MAX_TOKENS, GENERAL_DEFAULT
from lorakit.gate.verdict import DEFAULT_MAX_KL
from lorakit.merge.objectives import DEFAULT_OBJECTIVE, OBJECTIVES
from lorakit.scorecard.judge import DEFAULT_MAX_ACCURACY_DROP, DEFAULT_MIN_RETENTION

# The two instruction tasks bundled with lorakit (made by its own deterministic generators), so the embedded
# default release runs with no network.
DEFAULT_DATASETS = ("reverse-words", "number-words")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(v: str) -> str:
    """Dataset and registry names become folder and artifact names: keep them path-safe."""
    if not _NAME.match(v):
        raise ValueError("use letters, digits, '.', '_' or '-' (at most 64), starting with a letter or digit")
    return v


class _Section(BaseModel):
    """Refuses unknown keys: a misspelt option must fail loudly, not silently fall back to its default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetConfig(_Section):
    """One task: its data (a bundled dataset or local files) and how ``prepare_dataset`` renders it."""

    name: str = Field(description="Task name; names the prepared data, the adapter and their registry entries.")
    bundled: str | None = Field(None, description="Name of a dataset bundled with lorakit (instead of files).")
    files: list[str] = Field(default_factory=list, description="Local data files (JSONL, JSON, CSV, Parquet, text).")
    format: Literal["auto", "text", "instruction", "chat"] = "auto"
    max_length: int = Field(512, gt=0)
    pack: bool = True
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.1, ge=0, lt=1, description="Held-out test split for the final scorecard only.")
    seed: int = 0

    _safe_name = field_validator("name")(check_name)

    @model_validator(mode="after")
    def _one_source(self) -> DatasetConfig:
        if (self.bundled is None) == (not self.files):
            raise ValueError("give exactly one of 'bundled' (a bundled dataset name) or 'files' (a list of paths)")
        return self


class LoraConfig(_Section):
    """QLoRA training hyper-parameters, passed unchanged to ``lorakit.train.train_adapter``."""

    quant: Literal["nf4", "none"] = "nf4"
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target: str = "all-linear"
    rslora: bool = False
    # lr 1e-3 for 40 steps of 2 x 2 packed rows of 512 tokens (~4.5 epochs of a bundled task): 75% / 55% exact
    # match on the reverse-words / number-words test splits, where the earlier default (2e-4, one epoch) gave 0-7%
    # (bench/results/train_sweep.json, runs.*.exact_match_test). 2e-3 spiked the loss in a trial run (unrecorded).
    lr: float = Field(1e-3, gt=0)
    epochs: int | None = Field(None, gt=0)
    max_steps: int | None = Field(40, gt=0, description="Optimizer steps; null = 'epochs' (or one epoch).")
    # Two rows per micro-batch keeps CPU memory low: one step of 8 packed rows of 256 tokens peaked at 8.3 GiB RSS
    # without gradient checkpointing (bench/results/train.json, "memory"); activations, not logits, dominate.
    batch_size: int = Field(2, gt=0)
    grad_accum: int = Field(2, gt=0)
    seed: int = 0
    device: str = "auto"
    gradient_checkpointing: bool | None = Field(None, description="Default: on for CUDA, off on CPU.")
    variant: Literal["lora", "dora"] = Field("lora", description="dora: DoRA (magnitude x direction).")
    init: Literal["default", "loftq", "pissa", "olora"] = Field(
        "default", description="LoRA init; loftq needs quant nf4, pissa/olora need quant none.")
    lora_plus_ratio: float | None = Field(None, gt=0, description="LoRA+: B's lr = ratio x A's; null = off.")

    @model_validator(mode="after")
    def _init_fits_quant(self) -> LoraConfig:
        # The same rule as lorakit.train.variants.check_variant, in config keys, so preflight refuses it up front.
        if self.init == "loftq" and self.quant != "nf4":
            raise ValueError("init 'loftq' cancels the NF4 quantization error and needs quant 'nf4'")
        if self.init in ("pissa", "olora") and self.quant != "none":
            raise ValueError(f"init '{self.init}' rewrites the base into a residual and needs quant 'none'")
        if self.init in ("pissa", "olora") and self.variant == "dora":
            raise ValueError(f"init '{self.init}' cannot be saved converted for variant 'dora'; use init 'default'")
        return self


class MergeSearchConfig(_Section):
    """Merge weights chosen by measurement (``lorakit merge --search``; ``lorakit.merge.search``): the search
    maximises the worst task's retention on val (of NLL, or of exact match with ``objective: accuracy``); bounds left
    null take the library's defaults."""

    methods: list[Literal["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]] = Field(
        default_factory=lambda: ["linear"], min_length=1, description="Methods searched (trial budget split).")
    objective: Literal[tuple(OBJECTIVES)] = Field(  # type: ignore[valid-type]
        DEFAULT_OBJECTIVE, description="Retention of val NLL ('nll', cheap) or of greedy exact match ('accuracy').")
    max_trials: int | None = Field(None, gt=0, description="Merges evaluated at most; null = lorakit's default.")
    time_budget_s: float | None = Field(None, gt=0, description="Seconds; null = lorakit's default.")
    target_retention: float | None = Field(None, description="Report whether the best trial reaches it.")
    max_tokens: int | None = Field(None, gt=0, description="Score at most this many val tokens per task.")


class MergeConfig(_Section):
    """How the task adapters are combined into the base weights (``lorakit.merge.merge_adapters``)."""

    method: Literal["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"] = "linear"
    # Finite: a `.nan` weight in YAML would otherwise pass and fail only in the merge, after every adapter trained.
    weights: list[FiniteFloat] | None = Field(None, description="One weight per dataset, in order; default 1.0 each "
                                              "(task arithmetic: every adapter's full update).")
    density: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    normalize: bool | None = None
    loftq_base: Literal["dequantized", "original"] | None = Field(
        None, description="With lora.init loftq: merge into the dequantized NF4 base (exact) or the original one.")
    search: MergeSearchConfig | None = Field(
        None, description="Set to choose the weights (and density) on the tasks' val splits instead of 'weights'.")

    @model_validator(mode="after")
    def _search_or_weights(self) -> MergeConfig:
        if self.search is not None and self.weights is not None:
            raise ValueError("give 'weights' or 'search', not both: the search chooses the weights")
        if self.search is not None and self.loftq_base is not None:
            raise ValueError("'search' merges plain LoRA adapters; it does not apply with loftq_base")
        return self


class QuantizeConfig(_Section):
    """4-bit post-training quantization of the merged model (``lorakit.quantize.quantize_model``)."""

    # Defaults = lorakit.quantize.defaults.RELEASE_QUANTIZE (its docstring says why, citing bench/results/).
    method: Literal["gptq", "awq"] = RELEASE_QUANTIZE["method"]
    bits: Literal[4, 8] = 4
    group_size: int = Field(64, description="Quantization group size (a power of two).")
    sym: bool | None = Field(RELEASE_QUANTIZE["sym"], description="Symmetric grid; None = True for GPTQ, False "
                             "(zero point) for AWQ.")
    desc_act: bool = False
    # 64 blocks of 256 tokens: what the small bundled tasks can fill (128 x 512 needs 65k calibration tokens).
    n_samples: int = Field(64, gt=0)
    seq_len: int = Field(256, gt=0)
    target_degradation: float | None = Field(
        None, ge=0, description="Set to search the smallest configuration within this perplexity loss, starting "
        "from the one above (its method; its group size, then finer ones) (lorakit quantize --target-degradation).")
    max_trials: int = Field(12, gt=0, description="Search bound: quantizations tried at most.")
    time_budget_s: float = Field(10800.0, gt=0, description="Search bound: seconds.")
    seed: int = 0
    device: str = "auto"
    calib_dataset: str | None = Field(
        None, description="Dataset whose train split calibrates; default: every dataset's data prepared together.")
    calib_general: str | None = Field(
        RELEASE_QUANTIZE["calib_general"], description="General text mixed into calibration ('default' = the corpus "
        "shipped with lorakit, its last documents; a .txt/.jsonl file; null = the tasks only).")
    calib_general_fraction: float = Field(
        RELEASE_QUANTIZE["calib_general_fraction"], ge=0, lt=1, description="Share of the calibration blocks taken "
        "from calib_general.")


class GateConfig(_Section):
    """The release gate: the quantized model against the merged full-precision model, on every task's val split,
    on general text, and on the scorecard."""

    max_degradation: float = Field(0.05, ge=0, description="Largest accepted ppl(candidate)/ppl(baseline) - 1.")
    general_text: str | None = Field(
        GENERAL_DEFAULT, description="General text the release must keep (lorakit.gate.general): 'default' = the "
        "general-English corpus shipped with lorakit, or a .txt/.jsonl file or prep folder; null = no check.")
    general_max_degradation: float = Field(DEFAULT_GENERAL_MAX_DEGRADATION, ge=0, description="Largest accepted "
                                           "perplexity loss on general_text, quantized vs merged.")
    general_max_tokens: int | None = Field(DEFAULT_GENERAL_MAX_TOKENS, gt=0, description="Score the first this many "
                                           "tokens of general_text (null = all of it).")
    seq_len: int = Field(512, gt=0)
    stride: int | None = Field(None, gt=0, description="Window stride; default = seq_len (non-overlapping).")
    max_tokens: int | None = Field(None, gt=0, description="Evaluate at most this many tokens per data set.")
    max_kl: float | None = Field(DEFAULT_MAX_KL, ge=0, description="Largest accepted mean KL(p_merged || p_quantized) per "
                                 "token (nats); null = KL and top-1 agreement are reported, not judged.")
    min_retention: float | None = Field(
        DEFAULT_MIN_RETENTION, ge=0, description="Scorecard (val): the merged model keeps at least this share of "
        "each adapter's exact-match gain over the base; an adapter with no gain fails as not learned; null = report.")
    max_accuracy_drop: float | None = Field(
        DEFAULT_MAX_ACCURACY_DROP, ge=0, description="Scorecard (val): largest exact-match drop, quantized vs merged, "
        "per task (absolute); null = report.")


class ScorecardConfig(_Section):
    """The release scorecard (``lorakit.scorecard.build_scorecard``): every task, every model, val and test."""

    max_examples: int | None = Field(None, gt=0, description="Score at most this many examples per task and split "
                                     "(null = all).")


class ExportConfig(_Section):
    """Extra release formats, each gated like the quantized model (``lorakit.export``)."""

    gguf: Literal["f16", "q8_0", "q4_0", "q5_0", "q5_1"] | None = Field(
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
        default_factory=lambda: [DatasetConfig(name=n, bundled=n) for n in DEFAULT_DATASETS], min_length=1
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
    output_dir: str = Field("lorakit-out", description="Folder that holds every stage's output.")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of training, quantization and the gate (lorakit.compute): auto = bfloat16 only "
        "where it is fast for training/quantization, float32 for the gate; the merge is always float32.")

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
        if (self.lora.init == "loftq") != (self.merge.loftq_base is not None):
            raise ValueError("lora.init 'loftq' and merge.loftq_base go together: LoftQ adapters belong to the NF4 base, "
                             "so set merge.loftq_base (dequantized = exactly what was trained), and only with loftq")
        return self

    def merge_weights(self) -> list[float]:
        """The weights given, else 1.0 per dataset: a 1/n merge scales each task's update by 1/n and kept about half
        of each adapter's val gain on the bundled tasks, 1.0 each over 80% (bench/results/merge_search.json,
        variants.*.val.worst_retention); disjoint skills add (task arithmetic)."""
        return list(self.merge.weights) if self.merge.weights is not None else [1.0] * len(self.datasets)

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
