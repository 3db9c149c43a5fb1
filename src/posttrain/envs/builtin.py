"""Import every built-in environment so that its @register_env runs."""

from posttrain.envs import arithmetic  # noqa: F401
