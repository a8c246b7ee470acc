"""The training run: the loop, its components (engine, metrics, stopper, checkpoint guards, lock), start-up checks and the process group."""
