"""Baseline layer-pruning methods; each module registers its selector/repair and method presets on import."""
