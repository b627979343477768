"""What a run writes and reads: the config and the checkpoint."""
