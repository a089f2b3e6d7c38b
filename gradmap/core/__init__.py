"""The pruning library: torch and transformers only (no Hydra, W&B, lm-eval, datasets or pandas).

- ``registry``: name -> class registries with did-you-mean errors;
- ``components``: the selector / repair protocol, method presets, shared helpers;
- ``layers``: layer surgery (find, remove, temporarily skip decoder layers);
- ``capture``: activation capture with forward hooks;
- ``calib``: calibration token windows;
- ``timing``: the CUDA-synchronised timed span and peak memory;
- ``grads``: gradient plumbing shared by gradient-based selectors;
- ``stage1`` / ``stage2``: GradMAP's two stages;
- ``prune``: ``prune()``, the one entry point.
"""
