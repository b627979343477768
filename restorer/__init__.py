"""restorer: distributed training of a CNN that removes JPEG compression artifacts."""

__version__ = "0.1.0"
