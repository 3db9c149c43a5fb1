from posttrain.rollout.base import RolloutEngine
from posttrain.rollout.hf import HFEngine

__all__ = ["HFEngine", "RolloutEngine"]
