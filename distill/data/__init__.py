"""A prepared dataset read as micro batches: row order, masking collators."""
