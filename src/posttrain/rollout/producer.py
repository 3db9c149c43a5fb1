"""Where a stage's rollouts come from: in step with training, or ahead of it with bounded staleness.

    rollouts = Rollouts(lambda engine: collect(engine, ...), engine, max_staleness=k, version=v, own_engine=True)
    batch = next(rollouts)                         # step t's scored groups
    ...train...
    rollouts.post_weights(learner.weights(), v+1)  # the rollout side samples step t+1+k on, from these

max_staleness = 0: `next` runs collection now, with the weights of the last update (synchronous RL). k > 0: a
background thread runs the same `collect` generator ahead of the learner. Its i-th step samples with policy
version max(v, v + i - k), waiting until the learner has posted it, so the step the learner trains at version
v + i holds samples exactly min(i, k) versions old, whatever the threads' timing (the run repeats). Because the thread runs `collect` unchanged, the
order of sampler calls (next, generate, observe) is the synchronous one; only the weights differ.

Each StepRollouts carries the sampler's state right after its own step, so a checkpoint taken after training step t
stores the sampler as of step t, not as of the steps generated ahead; a resumed run re-generates those from there.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Mapping

from torch import Tensor

from posttrain.records import Completion, SamplingParams
from posttrain.rollout.base import RolloutEngine
from posttrain.rollout.collect import StepRollouts


class _Closed(Exception):
    pass


class WeightGate:
    """The rollout side's engine: generate() first waits until the version its step needs has been posted, then
    loads exactly that version (not a newer one that may have arrived: which weights a step samples with must not
    depend on thread timing, so an asynchronous run repeats). The learner posts from its thread; the engine is
    only touched from the producer's."""

    def __init__(self, engine: RolloutEngine, version: int):
        self.engine = engine
        self._cond = threading.Condition()
        self._posted: dict[int, dict[str, Tensor]] = {}  # versions posted and not yet loaded (at most k + 1)
        self._latest = version
        self.needed = version  # the version the step being generated needs
        self._closed = False

    @property
    def version(self) -> int:
        return self.engine.version

    def post(self, weights: dict[str, Tensor], version: int) -> None:
        with self._cond:
            self._posted[version], self._latest = weights, version
            self._cond.notify_all()

    def need(self, version: int) -> None:
        with self._cond:
            self.needed = max(version, self.engine.version)

    def generate(self, prompts, params: SamplingParams) -> list[Completion]:
        with self._cond:
            self._cond.wait_for(lambda: self._closed or self._latest >= self.needed)
            if self._closed:
                raise _Closed
            target = self.needed
            load = self._posted.get(target) if target > self.engine.version else None
            for v in [v for v in self._posted if v <= target]:
                del self._posted[v]
        if load is not None:
            self.engine.update_weights(load, target)
        return self.engine.generate(prompts, params)

    def update_weights(self, weights: Mapping[str, Tensor], version: int) -> None:
        self.post(dict(weights), version)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class Rollouts:
    """A stage's rollout stream (see the module docstring). own_engine: `engine` is the rollout side's alone (a
    copy, vLLM, Ray workers): post_weights syncs it. Otherwise it is the run's engine, which the stage syncs
    itself (and only max_staleness = 0 is possible: its weights are the learner's)."""

    def __init__(self, make_batches: Callable[[RolloutEngine], Iterator[StepRollouts]], engine: RolloutEngine, *,
                 max_staleness: int, version: int, own_engine: bool):
        if max_staleness > 0 and not own_engine:
            raise ValueError("asynchronous rollouts need an engine of their own")
        self.max_staleness = max_staleness
        self.engine = engine
        self.own_engine = own_engine
        self._base = version
        if max_staleness == 0:
            self._batches = make_batches(engine)
            return
        self._gate = WeightGate(engine, version)
        self._batches = make_batches(self._gate)
        self._queue: queue.Queue[StepRollouts | BaseException] = queue.Queue()
        self._thread = threading.Thread(target=self._produce, name="rollout-producer", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        step = 0
        try:
            while True:
                self._gate.need(self._base + step - self.max_staleness)
                self._queue.put(next(self._batches))
                step += 1
        except _Closed:
            return
        except BaseException as e:  # noqa: BLE001 - handed to the learner's thread, which raises it
            self._queue.put(e)

    def __iter__(self) -> Rollouts:
        return self

    def __next__(self) -> StepRollouts:
        if self.max_staleness == 0:
            return next(self._batches)
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def post_weights(self, weights: Mapping[str, Tensor], version: int) -> None:
        """The learner's weights after an update. Copied: the learner goes on changing its tensors in place."""
        if not self.own_engine:
            return
        if self.max_staleness == 0:
            self.engine.update_weights(weights, version)
        else:
            self._gate.post({k: v.detach().to("cpu", copy=True) for k, v in weights.items()}, version)

    def close(self) -> None:
        """Stop the producer (a step it is generating is finished and dropped) and release the engine."""
        if self.max_staleness > 0:
            self._gate.close()
            self._thread.join(timeout=600)
        if self.own_engine:
            self.engine.close()


def staleness(completions: list[Completion], version: int) -> list[int]:
    """Policy versions between each sample's sampler and the learner that trains on it."""
    return [version - c.policy_version for c in completions]
