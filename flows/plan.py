"""Where each stage of a release writes, and with which arguments: a pure function of the run config.

Output folders are content-addressed: ``<output_dir>/<stage>/<label>-<key>`` where ``key`` digests the stage's
arguments, which include the upstream folders (and so, transitively, their arguments). Two configs that share a
prefix of the chain share those folders, and a config never overwrites a folder another config still points at;
that is what makes Prefect's input-keyed cache safe to reuse across runs. Prefect-free, so it is tested directly.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flows.config import DatasetConfig, ReleaseConfig
from lorakit.gate.general import general_check
from lorakit.train.options import without_default_layers

STAGES = ("prep", "adapters", "merged", "quantized", "gguf", "scorecard", "gate")


def _key(args: dict[str, Any]) -> str:
    blob = json.dumps(args, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def sources(ds: DatasetConfig) -> list[str]:
    """The data files of a dataset: the bundled dataset's file, or the configured files made absolute."""
    if ds.bundled is not None:
        from lorakit.data.bundled import bundled_dataset_path  # the data-prep stage owns the bundled datasets

        return [str(bundled_dataset_path(ds.bundled))]
    return [str(Path(f).absolute()) for f in ds.files]


# Quantize options added after releases were made, each with the value that does what quantization did before it: a
# quantize call at that value leaves the key out of its arguments, so its stage folder and Prefect cache key stay.
QUANTIZE_OPTIONS_ADDED_LATER: dict[str, Any] = {"tune_tokens": "all", "tune_answer_weight": 1.0, "tune_samples": None,
                                                "keep_sensitive": 0}


def stage_dir(output_dir: str, stage: str, label: str, args: dict[str, Any]) -> str:
    return str(Path(output_dir) / stage / f"{label}-{_key(args)}")


@dataclass(frozen=True)
class ReleasePlan:
    """The arguments of every stage call, derived from one :class:`ReleaseConfig`."""

    config: ReleaseConfig

    @property
    def out(self) -> str:
        return str(Path(self.config.output_dir).absolute())

    def prep(self, ds: DatasetConfig) -> dict[str, Any]:
        params = ds.prep_params()
        params["base"] = self.config.base
        return {"sources": sources(ds), "params": params,
                "output": stage_dir(self.out, "prep", ds.name, {"sources": sources(ds), **params})}

    def calibration(self) -> dict[str, Any] | None:
        """Prep arguments for one calibration set made of every dataset's files (None: one dataset calibrates).

        Calibrated on the first task alone, a default run's gate rejected the other task after GPTQ 4-bit
        (bench/results/pipeline.json, ``earlier_quieter_run``).
        """
        if self.config.calib_dataset() is not None:
            return None
        first = self.config.datasets[0]
        params = first.prep_params()
        params["base"] = self.config.base
        files = [f for ds in self.config.datasets for f in sources(ds)]
        return {"sources": files, "params": params,
                "output": stage_dir(self.out, "prep", "calibration", {"sources": files, **params})}

    def train(self, ds: DatasetConfig, prep_dir: str) -> dict[str, Any]:
        # layers 'all' left out, so adapters trained before the option stay cached
        params = without_default_layers(self.config.lora_for(ds).model_dump())
        params["base"] = self.config.base
        params["compute_dtype"] = self.config.compute_dtype
        return {"prep_dir": prep_dir, "params": params,
                "output": stage_dir(self.out, "adapters", ds.name, {"prep": prep_dir, **params})}

    def merge(self, adapters: list[str], preps: dict[str, str] | None = None) -> dict[str, Any]:
        """``preps`` (dataset name -> prepared folder) is needed with ``merge.search`` (the tasks it scores) and
        with method regmean (the data whose layer inputs it keeps)."""
        m = self.config.merge
        params = {"method": m.method, "density": m.density, "seed": m.seed, "normalize": m.normalize,
                  "output_kind": "model", "base": self.config.base}
        if m.loftq_base is not None:  # only then, so the merged stage's folder name is unchanged for other runs
            params["loftq_base"] = m.loftq_base
        if self.config.merges_with_regmean():  # it reads each adapter's training data, in dataset order
            if preps is None:
                raise ValueError("merge method regmean needs the prepared data of every dataset (preps)")
            params.update(regmean_alpha=m.regmean_alpha, regmean_examples=m.regmean_examples,
                          regmean_anchor=m.regmean_anchor)
        weights: list[float] | None = self.config.merge_weights()
        search = self.config.merge_search()
        if m.method == "regmean" and search is None:  # a search reads the same folders from its own data
            params["data"] = [preps[ds.name] for ds in self.config.datasets]
        if search is not None:  # only then, like loftq_base; the weights are the search's to choose
            if preps is None:
                raise ValueError("merge.search needs the prepared data of every dataset (preps)")
            # scored with the gate's window length, so the search measures the tasks as the gate will
            params["search"] = {**search.model_dump(), "seq_len": self.config.gate.seq_len,
                                "data": {ds.name: preps[ds.name] for ds in self.config.datasets}}
            weights = None
        return {"adapters": adapters, "weights": weights, "params": params,
                "output": stage_dir(self.out, "merged", "model", {"adapters": adapters, "weights": weights, **params})}

    def quantize(self, model_dir: str, calib: str) -> dict[str, Any]:
        params = self.config.quantize.model_dump(exclude={"calib_dataset"})
        for key, before in QUANTIZE_OPTIONS_ADDED_LATER.items():  # at these values stage folders and caches stay valid
            if params[key] == before:
                del params[key]
        params["calib"] = calib
        g = self.config.gate
        if params["target_degradation"] is not None and g.general_text is not None:
            # the search must meet the target on the gate's general text as well as on the tasks
            params.update(eval_general=g.general_text, eval_general_max_tokens=g.general_max_tokens)
        params["compute_dtype"] = self.config.compute_dtype
        return {"model_dir": model_dir, "params": params,
                "output": stage_dir(self.out, "quantized", params["method"], {"model": model_dir, **params})}

    def export_gguf(self, model_dir: str) -> dict[str, Any]:
        params = {"qtype": self.config.export.gguf}
        return {"model_dir": model_dir, "params": params,
                "output": stage_dir(self.out, "gguf", params["qtype"], {"model": model_dir, **params})}

    def scorecard(self, adapters: dict[str, str], merged: str, quantized: str, preps: dict[str, str]
                  ) -> dict[str, Any]:
        """Base, each dataset's adapter, merged and quantized on every dataset's val and test splits; perplexity
        with the gate's method settings."""
        g = self.config.gate
        tasks = [[ds.name, preps[ds.name], adapters[ds.name]] for ds in self.config.datasets]
        params = {"seq_len": g.seq_len, "stride": g.stride or g.seq_len, "max_tokens": g.max_tokens,
                  "max_examples": self.config.scorecard.max_examples,
                  "judge_examples": self.config.scorecard.judge_examples, "dtype": self.config.compute_dtype}
        if g.general_text is not None:  # every model on the gate's general text: what each keeps of its language
            params.update(general=g.general_text, general_max_tokens=g.general_max_tokens)
        args = {"base": self.config.base, "tasks": tasks, "merged": merged, "quantized": quantized}
        return {**args, "params": params, "output": stage_dir(self.out, "scorecard", "card", {**args, **params})}

    def gate(self, baseline: str, candidate: str, preps: dict[str, str], scorecard: str | None = None
             ) -> dict[str, Any]:
        """The first dataset's validation split is the primary check; every other task is a check of its own,
        with the same threshold (the release passes only when all pass). With ``scorecard`` (the quantized
        model's), its retention and accuracy-drop checks too."""
        g = self.config.gate
        params = {"max_degradation": g.max_degradation, "seq_len": g.seq_len, "stride": g.stride or g.seq_len,
                  "max_tokens": g.max_tokens, "dtype": self.config.compute_dtype}
        if g.max_kl is not None:  # only when set, so caches of gates run before the option existed stay valid
            params["max_kl"] = g.max_kl
        first, *others = [ds.name for ds in self.config.datasets]
        params["primary_name"] = first  # the verdict names every task's check after its task
        extra = [{"name": n, "data": preps[n], "max_degradation": g.max_degradation, "kind": "task", "split": "val"}
                 for n in others]
        general = general_check(g.general_text, g.general_max_degradation, g.general_max_tokens)
        if general is not None:
            extra.append(asdict(general))
        args = {"baseline": baseline, "candidate": candidate, "data": preps[first], "extra_checks": extra}
        if scorecard is not None:
            params.update(scorecard=scorecard, min_retention=g.min_retention, max_accuracy_drop=g.max_accuracy_drop,
                          max_general_forgetting=g.max_general_forgetting)
        return {**args, "params": params, "output": stage_dir(self.out, "gate", "verdict", {**args, **params})}
