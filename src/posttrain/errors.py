"""User-facing errors: the CLI prints these as one line (no traceback unless --debug)."""


class UserError(Exception):
    """A problem the user can fix: a bad recipe key, a missing file, a corrupt checkpoint.

    The message must name the offending file, key or value.
    """


class RunStopped(UserError):
    """The run was asked to stop (SIGTERM: `timeout`, a SLURM preemption) and stopped at a step boundary after
    writing a checkpoint; re-running the same command resumes from it."""


class MissingExtraError(UserError):
    """An optional dependency is not installed; the message says which `pip install` fixes it."""

    def __init__(self, package: str, extra: str):
        super().__init__(f"{package} is not installed: run `pip install -e '.[{extra}]'` (or `pip install {package}`)")


class ConfigError(Exception):
    """A recipe problem found by a validator, naming the dotted key (`rl.policy_loss_args.eps_high`). Not a
    ValueError on purpose: pydantic would re-wrap that and lose the key. config.validate turns it into a
    UserError that also names the recipe file."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


class Terminated(BaseException):
    """SIGTERM, raised where the program is by a handler for work with nothing to save (a command writing a file, a
    run in its start-of-run evaluation). A BaseException, as KeyboardInterrupt is, so that no `except Exception`
    (around a verifier call, say) swallows it; the code that installed the handler turns it into RunStopped."""
