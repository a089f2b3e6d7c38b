"""Evaluation at the suite's edge: lm-evaluation-harness on the in-memory model (``harness``), WikiText-2
perplexity (``perplexity``), the local task YAMLs (``tasks``) and inference speed (``speed``)."""
