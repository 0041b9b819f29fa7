"""Merge demo on the embedded default model (the main job until the release pipeline composes every stage).

Creates two synthetic LoRA adapters for SmolLM2-135M-Instruct, merges them with ``lorakit merge a b --weights
0.5,0.5`` into an adapter (exact) and into a full model, and checks the merged model against a direct
computation of W + Σ wᵢ·scalingᵢ·BᵢAᵢ.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def main(out_dir: str = "demo-out") -> int:
    import torch
    from safetensors.torch import load_file

    from lorakit.adapters import load_adapter
    from lorakit.merge import merge_adapters
    from lorakit.models import ensure_default_model
    from lorakit.models.synthetic import make_random_adapter
    from lorakit.runtime import configure_threads

    configure_threads()
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    base = ensure_default_model()
    print(f"base model: {base}")
    a = make_random_adapter(base, out / "adapter-a", r=8, alpha=16, seed=1)
    b = make_random_adapter(base, out / "adapter-b", r=16, alpha=16, seed=2, use_rslora=True)
    adapter = merge_adapters([a, b], [0.5, 0.5], out / "merged-adapter")
    model = merge_adapters([a, b], [0.5, 0.5], out / "merged-model", output_kind="model", base=base)
    la, lb = load_adapter(a), load_adapter(b)
    W, M = load_file(base / "model.safetensors"), load_file(model.output / "model.safetensors")
    worst = max(
        (M[f"{n}.weight"].double() - W[f"{n}.weight"].double() - 0.5 * la.modules[n].delta(torch.float64)
         - 0.5 * lb.modules[n].delta(torch.float64)).abs().max().item()
        for n in la.modules
    )
    print(f"merged adapter (exact, rank {adapter.metadata['inputs'][0]['r'] + adapter.metadata['inputs'][1]['r']}): "
          f"{adapter.output}")
    print(f"merged model: {model.output}; max |merged − (W + Σ wᵢ·ΔWᵢ)| = {worst:.2e}")
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
