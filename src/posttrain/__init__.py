"""posttrain: the science of LLM post-training, runnable on a laptop."""

__version__ = "0.1.0"
