"""The training run: the loop, its components (engine, checkpointer, metrics, stopper, save guards, lock), start-up checks and the process group."""
