"""Import every built-in environment so that its @register_env runs.

Adapters (reasoning_gym, math, jsonl, code) import their optional dependencies lazily, inside the class, so
importing this module never needs an extra.
"""

from posttrain.envs import (  # noqa: F401
    arithmetic,
    calculator,
    code,
    countdown,
    guess_number,
    jsonl,
    mixture,
    retry,
    rgym,
    sorting,
    strings,
)
