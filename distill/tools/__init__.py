"""Commands around a run: export, evaluation, fine-tuning, demo assets, the configuration reference."""
