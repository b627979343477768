"""Training: the loop, its loader, the optimizer, the start-up checks, reporting, trackers, stopping."""
