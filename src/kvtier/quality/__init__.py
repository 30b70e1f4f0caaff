"""Measuring approximate KV (blending, lossy codecs) against full recompute: a seeded multi-passage QA set and
the scores that tell how far a model's behaviour moved."""
