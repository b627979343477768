"""Cluster glue: the process group, and what a SLURM job runs with."""
