"""Data: the MeMa folder layout, grain pipelines, and the MeMa-Synth renderer."""
