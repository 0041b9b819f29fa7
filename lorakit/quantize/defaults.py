"""The quantization configuration the release flow uses by default (the embedded SmolLM2-135M release).

Measured by ``python -m bench.release_quality`` (bench/results/release_quality.json) on the default release
itself: the merged model of the two bundled-task QLoRA adapters, calibrated on their train splits, scored on
their val splits with the gate's method (dequantized path). AWQ 4-bit, group 64, asymmetric: +1.9% perplexity
at 114.0 MB (42% of the 269 MB bf16 size), standard AWQ GEMM layout that plain transformers loads. It is the
first (smallest) configuration the ``--target-degradation 0.05`` search tries that passes. Group 128 does not
divide SmolLM2's hidden size 576. On general English prose the same model loses more (GPTQ g64 sym +21%, AWQ
g64 asym +11.5%): for other data or models, set ``target_degradation`` and let the search measure
(``lorakit.quantize.search.search_quantization``).
"""

RELEASE_QUANTIZE = {"method": "awq", "bits": 4, "group_size": 64, "sym": False, "desc_act": False,
                    "n_samples": 32, "seq_len": 512, "seed": 0}
RELEASE_TARGET_DEGRADATION = 0.05  # the gate's default; a run config's `target_degradation` turns the search on
