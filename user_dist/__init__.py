"""user-dist: distributed DeepSpeed training and evaluation of USER image-text retrieval."""

__version__ = "0.1.0"
