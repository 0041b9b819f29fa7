"""The quantization configuration the release flow uses by default for the embedded SmolLM2-135M.

Measured (bench/results/release_quality.json) on the default release's data (the bundled tasks' val split, base
SmolLM2-135M-Instruct, lorakit's perplexity method, dequantized path): GPTQ 4-bit g32 asym +0.7% at 118.8 MB
(44% of bf16) — passes the 5% gate with margin and loads with plain transformers; AWQ 4-bit g32 asym +4.1% at
118.1 MB passes too, with little margin. g128 is invalid for SmolLM2 (hidden 576) and g64 sym lost 21% on prose.
Pass ``target_degradation`` to search instead (lorakit.quantize.search), e.g. for other models or data.
"""

RELEASE_QUANTIZE = {"method": "gptq", "bits": 4, "group_size": 32, "sym": False, "desc_act": False,
                    "n_samples": 32, "seq_len": 512, "seed": 0}
RELEASE_TARGET_DEGRADATION = 0.05  # the gate's default; a run config's `target_degradation` turns the search on
