"""The base layer: errors, choices, the command line's face, files, URLs, JPEG's standard tables."""
