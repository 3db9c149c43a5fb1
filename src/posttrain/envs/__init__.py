from posttrain.envs.base import Environment, split_of
from posttrain.envs.registry import available_envs, describe_envs, make_env, register_env

__all__ = ["Environment", "available_envs", "describe_envs", "make_env", "register_env", "split_of"]
