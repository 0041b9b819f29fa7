"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds the LoRA weights, the optimizer state, the RNG states (dropout) and the log so far; the data
order is a function of the step (see :mod:`lorakit.train.batches`) and the learning rate a function of the step,
so nothing else is needed. Checkpoints live next to the output (``<output>.checkpoints/step-N``) because the
output folder itself only appears, atomically, when the run has passed the sanity gate.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import InputError
from lorakit.io.atomic import atomic_dir, read_json, write_json

STATE_FILE = "state.json"


def checkpoint_root(output: Path) -> Path:
    return output.parent / f"{output.name}.checkpoints"


def _lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], log: list[dict], keep: int = 2) -> Path:
    dest = root / f"step-{step:07d}"
    with atomic_dir(dest, force=True) as tmp:
        torch.save(_lora_state(model), tmp / "lora.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / "train_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
        write_json(tmp / STATE_FILE, {**state, "step": step})
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def latest_checkpoint(root: Path) -> Path | None:
    found = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).exists())
    return found[-1] if found else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    fingerprint: str) -> tuple[dict[str, Any], list[dict]]:
    state = read_json(path / STATE_FILE, "checkpoint state")
    if state.get("fingerprint") != fingerprint:
        raise InputError(
            f"checkpoint {path} belongs to a run with other data or settings; --resume needs the same prep folder, "
            "base and hyper-parameters (or delete the checkpoints to start over)"
        )
    lora = torch.load(path / "lora.pt", weights_only=True)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in lora.items():
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    log = [json.loads(line) for line in (path / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return state, log
