"""distill-prune: a student cut from its teacher by importance (scores from a calibration pass, a shape or a budget,
every tensor sliced consistently), written as a Hugging Face directory with its provenance."""
