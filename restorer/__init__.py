"""restorer: distributed training of a CNN that removes JPEG compression artifacts.

The folders are the layers, lowest first. A module imports from its own folder and from the layers
below it, never from one above or beside it (tests/test_layers.py checks every import, lazy ones
included, and that no modules import each other in a circle):

    base        errors, choices, the command line's face, files, URLs, JPEG's standard tables
    data        decoding photos, JPEG degradation, patches, shards, the training stream   | models  the networks
    formats     what a run writes and reads: the config, the checkpoint
    infer       a trained network over whole photos, the metrics, pictures                | cluster  process group, SLURM
    train       the loop, its loader, the optimizer, checks, reporting, trackers, stopping
    tools       the commands (`restorer --help`)
"""

__version__ = "0.1.0"

# lowest first; the folders of one layer never import each other (restorer/__init__ and __main__ sit above all)
LAYERS = (("base",), ("data", "models"), ("formats",), ("infer", "cluster"), ("train",), ("tools",))
