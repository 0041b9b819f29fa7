"""``lorakit_quant.json``: how a quantized folder was made, as a typed record that maps 1:1 to the file."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import InputError
from lorakit.io.atomic import read_json, write_json

QUANT_META = "lorakit_quant.json"


@dataclass
class QuantParams:
    """Every parameter that defines the result (as used, after defaults and adjustments)."""

    method: str
    bits: int
    group_size: int
    group_size_requested: int
    sym: bool
    desc_act: bool
    n_samples: int
    seq_len: int
    seed: int
    device: str
    layout: str  # "awq-gemm" or "gptq-v1"
    method_params: dict[str, Any] = field(default_factory=dict)
    module_bits: dict[str, int] = field(default_factory=dict)  # per-module precision overrides (mixed.py)
    compute_dtype: str = ""  # the dtype the model ran in (lorakit.compute); "" in records from before it was kept
    # torch's CPU thread count while it ran (0 in older records): it orders GPTQ's float sums, so the same input and
    # settings at another count give other codes (docs/quantize.md, "Leaving the most sensitive linears unquantized")
    threads: int = 0
    tune_steps: int = 0  # scale tuning after rounding (lorakit.quantize.tune); 0 = none, as in older records
    tune_lr: float = 0.0
    tune_general_fraction: float = 0.0
    tune_tokens: str = ""  # "all" | "answers" (what tuning asked for; tuning["tokens"] is what it did); "" = older
    tune_answer_weight: float = 1.0  # with tokens "all": an answer position's weight in the KL (1 in older records)
    tune_samples: int = 0  # blocks scale tuning drew (0 in older records: the calibration's n_samples)
    keep_sensitive: int = 0  # the most sensitive linears asked to stay unquantized (0 in older records)


@dataclass
class QuantMeta:
    lorakit_version: str
    params: QuantParams
    input: dict[str, Any]  # path, model_type, weights_digest
    calibration: dict[str, Any]  # source, digests, sample count, sampling rule
    backend: dict[str, Any]  # name and library versions
    wall_time_s: float
    size_before_bytes: int
    size_after_bytes: int
    how_to_load: str
    notes: list[str] = field(default_factory=list)
    quality: dict[str, Any] = field(default_factory=dict)  # per-module losses / AWQ search results
    loaders: list[str] = field(default_factory=list)  # who reads this checkpoint (mixed.loaders)
    search: dict[str, Any] = field(default_factory=dict)  # --target-degradation: every trial (search.py)
    tuning: dict[str, Any] = field(default_factory=dict)  # scale tuning's record (tune.py): held-out KL, kept

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def used_settings(self) -> dict[str, Any]:
        """The settings this checkpoint was made with, as used: after group-size lowering, with the calibration
        size actually drawn, and the search's pick when a search chose them (what a report or lineage records)."""
        p = self.params
        used = {"method": p.method, "bits": p.bits, "group_size": p.group_size, "sym": p.sym,
                "desc_act": p.desc_act, "n_samples": p.n_samples, "seq_len": p.seq_len, "seed": p.seed,
                "layout": p.layout, "module_bits": dict(p.module_bits)}
        if "clip" in p.method_params or "clip_norm" in p.method_params:
            used["clip_search"] = bool(p.method_params.get("clip", p.method_params.get("clip_norm")))
        if p.method_params.get("gptaq_alpha"):
            used["gptaq_alpha"] = p.method_params["gptaq_alpha"]
        if p.keep_sensitive:
            used["keep_sensitive"] = p.keep_sensitive
        if p.tune_steps:
            used.update(tune_steps=p.tune_steps, tune_lr=p.tune_lr, tune_general_fraction=p.tune_general_fraction,
                        tune_tokens=self.tuning.get("tokens", "all"), tune_kept=bool(self.tuning.get("kept")))
            if p.tune_samples and p.tune_samples != p.n_samples:
                used["tune_samples"] = p.tune_samples
            if self.tuning.get("answer_weight", 1.0) != 1.0:  # what it did: data without answers weighs none up
                used["tune_answer_weight"] = self.tuning["answer_weight"]
        if p.group_size_requested != p.group_size:
            used["group_size_requested"] = p.group_size_requested
        requested = self.calibration.get("n_samples_requested", p.n_samples)
        if requested != p.n_samples:
            used["n_samples_requested"] = requested
        if self.search:
            used["search"] = {k: self.search.get(k) for k in ("target_degradation", "passed", "chosen_trial")}
        return used

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantMeta:
        try:
            params = QuantParams(**data["params"])
            rest = {k: v for k, v in data.items() if k != "params"}
            return cls(params=params, **rest)
        except (KeyError, TypeError) as exc:
            raise InputError(f"{QUANT_META} does not match this lorakit version's format ({exc})") from None


def write_quant_meta(folder: Path, meta: QuantMeta) -> None:
    write_json(folder / QUANT_META, meta.to_dict())


def read_quant_meta(folder: str | os.PathLike[str]) -> QuantMeta:
    """The record of a quantized folder; an InputError if it is missing or malformed."""
    return QuantMeta.from_dict(read_json(Path(folder) / QUANT_META, "quantization record"))
