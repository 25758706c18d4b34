"""cheers: a faithful, fast and hackable implementation of the Cheers unified multimodal model."""

__version__ = "0.1.0"
