from posttrain.rollout.base import ENGINES, RolloutEngine, build_engine

__all__ = ["ENGINES", "RolloutEngine", "build_engine"]
