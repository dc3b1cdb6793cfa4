"""Image-quality evaluation of quantized models (docs/EVALUATION.md), split by job:

- ``protocol``: the paper's protocol (``evaluate``), the rank sweep, the per-layer error table;
- ``images``: evaluation items and their PNG cache, procedural renders, contact sheets;
- ``metrics``: PSNR, SSIM, bootstrap CIs; LPIPS / FID / CLIP only from local weights;
- ``judge``: the embedded model's prompt-faithfulness judge;
- ``shapes_grammar`` / ``shapes_render``: the caption grammar and renderer of the shapes world;
- ``report``: Markdown and JSON writers.
"""

from .protocol import (Evaluator, default_methods, evaluate, layer_error_table, make_config, method_choices,
                       rank_sweep, read_prompts, sweep_methods)

__all__ = ["Evaluator", "evaluate", "rank_sweep", "layer_error_table", "make_config", "read_prompts",
           "method_choices", "default_methods", "sweep_methods"]
