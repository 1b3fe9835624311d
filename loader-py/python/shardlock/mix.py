"""Weighted mixing of datasets: :class:`Mix`."""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from shardlock._lib import ShardlockError, mix_choices
from shardlock.loader import Loader, _int_arg

#: Stream choices fetched from the native schedule at a time.
_CHUNK = 1024


class Mix:
    """Interleaves several :class:`Loader` streams by weight, one batch at a time.

    ``streams`` is a list of ``(loader, weight)``: each loader is a dataset of its
    own, with its own token, keyring and trust anchor (each authorized on its own), its
    own shuffle and seed, and its own rank split. Weights are positive numbers (they are
    normalized). Step ``t`` yields the next batch of the stream a pure function of
    ``(seed, t)`` picks (the same as Rust's ``shardlock::Mix``), so every rank draws the
    same stream at the same step, and :meth:`load_state_dict` continues the same
    sequence. A stream that reaches the end of its epoch starts its next one (its own
    epoch count, :attr:`epochs`), so the mix does not run dry: ``steps`` bounds one
    pass (``len()``), else iteration goes on until you stop. Each batch holds samples
    of one stream (litdata's ``batching_method="per_stream"``); :attr:`stream` says
    which. The loaders should deliver the same fields (``fields=[...]`` picks common
    ones).

        >>> mix = shardlock.Mix([(web, 0.7), (books, 0.3)], seed=0, steps=10_000)
        >>> for batch in mix:
        ...     train_step(batch)
    """

    def __init__(self, streams: Sequence[Tuple[Loader, float]], *, seed: int = 0, steps: Optional[int] = None) -> None:
        pairs = list(streams)
        if not pairs:
            raise ValueError("a Mix needs at least one (loader, weight) stream")
        for i, p in enumerate(pairs):
            if not (isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], Loader)):
                raise TypeError(f"stream {i}: give a (shardlock.Loader, weight) tuple; got {type(p).__name__}")
        self._loaders: List[Loader] = [p[0] for p in pairs]
        self._weights: List[float] = [float(p[1]) for p in pairs]
        self._seed = _int_arg("seed", seed, 0)
        self._steps = None if steps is None else _int_arg("steps", steps, 0)
        mix_choices(self._seed, self._weights, 0, 1)  # checks the weights now
        self._step = 0
        self._iters: List[Optional[Iterator[Dict[str, Any]]]] = [None] * len(pairs)
        self._epochs: List[int] = [lo.epoch for lo in self._loaders]
        self._stream: Optional[int] = None
        self._choices: List[int] = []
        self._choices_from = 0

    def __len__(self) -> int:
        """Batches left in this pass (``steps`` minus the steps taken); a mix without
        ``steps`` has no length."""
        if self._steps is None:
            raise TypeError("this Mix has no steps= bound, so no length")
        return max(0, self._steps - self._step)

    def _choice(self, step: int) -> int:
        if not (self._choices_from <= step < self._choices_from + len(self._choices)):
            self._choices = mix_choices(self._seed, self._weights, step, _CHUNK)
            self._choices_from = step
        return self._choices[step - self._choices_from]

    def _next_of(self, s: int) -> Dict[str, Any]:
        for _ in range(2):
            it = self._iters[s]
            if it is None:
                self._epochs[s] = self._loaders[s].epoch
                it = self._iters[s] = iter(self._loaders[s])
            try:
                return next(it)
            except StopIteration:
                self._iters[s] = None  # the stream's epoch ended: its next epoch
        raise ShardlockError(f"mix stream {s} yields no batch in a whole epoch: too few samples for its batch size on "
                             "this rank")

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        while self._steps is None or self._step < self._steps:
            s = self._choice(self._step)
            batch = self._next_of(s)
            self._stream = s
            self._step += 1
            yield batch

    @property
    def stream(self) -> Optional[int]:
        """The stream the last batch came from (its position in ``streams``)."""
        return self._stream

    @property
    def step(self) -> int:
        """Batches yielded so far (restored by :meth:`load_state_dict`)."""
        return self._step

    @property
    def epochs(self) -> List[int]:
        """The epoch each stream reads now."""
        return [self._epochs[i] if it is not None else lo.epoch for i, (lo, it) in enumerate(zip(self._loaders, self._iters))]

    def state_dict(self) -> Dict[str, Any]:
        """Resume state: the step and every stream's :meth:`Loader.state_dict`."""
        return {"seed": self._seed, "weights": list(self._weights), "step": self._step,
                "streams": [lo.state_dict() for lo in self._loaders]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continues the mix recorded in ``state`` (same seed, weights and streams)."""
        if state.get("seed") != self._seed or [float(w) for w in state.get("weights", [])] != self._weights:
            raise ValueError(f"mix state is for seed {state.get('seed')} and weights {state.get('weights')}; this Mix "
                             f"has seed {self._seed} and weights {self._weights}")
        streams = state.get("streams", [])
        if len(streams) != len(self._loaders):
            raise ValueError(f"mix state has {len(streams)} streams; this Mix has {len(self._loaders)}")
        for lo, st in zip(self._loaders, streams):
            lo.load_state_dict(st)
        self._iters = [None] * len(self._loaders)
        self._step = _int_arg("step", state.get("step"), 0)
