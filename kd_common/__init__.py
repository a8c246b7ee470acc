"""Small helpers every stage shares (the bottom layer: nothing here imports data_prep or distill)."""
