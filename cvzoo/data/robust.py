"""Robust loading from flaky remote stores: retry, skip and count bad examples, keep every rank in step.

Three pieces work together::

    dataset = RobustDataset(StoreDataset(...), retries=3)            # retries, skips, records
    loader = DataLoader(dataset, batch_size=32, num_workers=8, sampler=DistributedSampler(dataset),
                        collate_fn=robust_collate(default_collate))  # strips the records, attaches them to the batch
    loader = RobustLoader(loader, max_skip_fraction=0.01)            # yields plain batches, counts, reports, raises
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, targets in loader:
            ...
        print(loader.last_report)

How an exception raised by the wrapped dataset is treated (see `classify_error`):

- **transient** (the store hiccuped: `ConnectionError`, `TimeoutError`, DNS failures, an incomplete HTTP read,
  HTTP 408/429/5xx, and any `OSError` whose errno says "try again": EAGAIN, EBUSY, EINTR, ETIMEDOUT, ECONN*,
  ENET*, EHOST*, ESTALE, EIO, EREMOTEIO): retried with exponential backoff, `backoff * 2**k` capped at
  `max_backoff`; once `retries` retries have failed too, the example is skipped.
- **corrupt** (the example itself is bad: missing or unreadable, `FileNotFoundError`, `PermissionError`,
  `IsADirectoryError`, HTTP 404/410, `EOFError`, PIL's `UnidentifiedImageError` and `DecompressionBombError`,
  `json.JSONDecodeError`, `UnicodeDecodeError`, `pickle.UnpicklingError`, zlib/gzip/zip/tar/lzma errors, and a
  bare `OSError` with no errno, which is how decoders such as PIL say "image file is truncated" or "broken data
  stream"): skipped at once, no retry.
- **anything else** is a programming or system error and propagates at once with its traceback, never counted:
  `TypeError`, `KeyError`, `IndexError`, `ValueError`, `AssertionError`, ..., and the `OSError`s that are not
  about one example: EMFILE/ENFILE (a file-descriptor leak), ENOMEM, ENOSPC, EBADF, EINVAL, ... and
  `OSError` subclasses from other libraries that carry no errno. A bug may also hide behind a class listed above
  (a wrong path template gives `FileNotFoundError` for every example); `max_consecutive_failures` and
  `max_skip_fraction` turn such a systematic failure into a `DataLoadingError` within a few examples.

A skipped example is replaced by the next index (modulo the length), so batch sizes, and so the number and shapes
of batches, are the same on every rank: this is what keeps DistributedDataParallel from hanging. The skip records
travel with the sample out of the DataLoader worker (`RobustItem`), `robust_collate` gathers them onto the batch
(`RobustBatch`, a NamedTuple, so it survives worker->main transfer and `pin_memory`), and `RobustLoader` strips
them again, so the trainer sees exactly the batches the inner collate function made.
"""

from __future__ import annotations

import errno
import gzip
import http.client
import json
import logging
import lzma
import math
import operator
import pickle
import random
import socket
import tarfile
import time
import urllib.error
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, IterableDataset
from torch.utils.data._utils.collate import default_collate

try:  # Pillow comes with torchvision; without it there is simply nothing of it to classify
    from PIL import Image as _PILImage
    from PIL import UnidentifiedImageError as _PILUnidentified

    _PIL_ERRORS: tuple[type[BaseException], ...] = (_PILUnidentified, _PILImage.DecompressionBombError)
except ImportError:  # pragma: no cover
    _PIL_ERRORS = ()

__all__ = [
    "CORRUPT_ERRORS",
    "TRANSIENT_ERRORS",
    "DataLoadingError",
    "RobustBatch",
    "RobustCollate",
    "RobustDataset",
    "RobustItem",
    "RobustLoader",
    "SkipRecord",
    "SkipReport",
    "classify_error",
    "robust_collate",
]

logger = logging.getLogger(__name__)

Failure = Literal["transient", "corrupt"]

#: Exceptions that mean "the store failed this time; asking again may work".
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,  # ConnectionReset/Refused/Aborted, BrokenPipe, http.client.RemoteDisconnected
    TimeoutError,  # also socket.timeout, concurrent.futures.TimeoutError
    InterruptedError,
    socket.gaierror,  # DNS lookups fail transiently; a wrong host name exhausts retries, then the guards trip
    http.client.IncompleteRead,
)

#: Exceptions that mean "this example is missing or its bytes are bad; asking again will not help".
CORRUPT_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,  # one unreadable object; wrong credentials fail every example and trip the guards
    EOFError,
    json.JSONDecodeError,
    UnicodeDecodeError,
    pickle.UnpicklingError,
    zlib.error,
    gzip.BadGzipFile,
    zipfile.BadZipFile,
    tarfile.ReadError,
    lzma.LZMAError,
    *_PIL_ERRORS,
)

# errno values that say "try again": the network, a remote or network file system, a busy device. EIO counts as
# transient because on remote stores (NFS, FUSE mounts of object stores) it is mostly a dropped request; on a local
# disk with a bad sector the retries fail too and the example is skipped.
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EAGAIN", "EWOULDBLOCK", "EINTR", "EBUSY", "ETIMEDOUT", "ECONNRESET", "ECONNABORTED", "ECONNREFUSED",
        "ENETDOWN", "ENETUNREACH", "ENETRESET", "EHOSTDOWN", "EHOSTUNREACH", "ESTALE", "EIO", "EREMOTEIO",
        "ENOLINK", "ECOMM", "EPROTO",
    )
    if hasattr(errno, name)
)  # fmt: skip
# errno values that say "this one file is not there or not readable".
_MISSING_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM})
_TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
_MISSING_HTTP = frozenset({404, 410})


def classify_error(
    exc: BaseException,
    *,
    transient: tuple[type[BaseException], ...] = TRANSIENT_ERRORS,
    corrupt: tuple[type[BaseException], ...] = CORRUPT_ERRORS,
) -> Failure | None:
    """Returns "transient" (retry), "corrupt" (skip) or None (a programming/system error: propagate).

    The classes in `transient` and `corrupt` are checked first, then a few rules that need more than the class:
    `urllib.error.HTTPError` by status code (404/410 corrupt, 408/425/429/5xx transient, others such as 401/403
    propagate), `urllib.error.URLError` by its reason, and any other `OSError` by errno (see the module docstring).
    A bare `OSError` without errno is corrupt: that is what decoders raise for truncated or broken data.
    """
    if isinstance(exc, transient):
        return "transient"
    if isinstance(exc, corrupt):
        return "corrupt"
    if isinstance(exc, urllib.error.HTTPError):
        if exc.code in _TRANSIENT_HTTP:
            return "transient"
        return "corrupt" if exc.code in _MISSING_HTTP else None
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        return classify_error(reason, transient=transient, corrupt=corrupt) if isinstance(reason, Exception) else None
    if isinstance(exc, OSError):
        if exc.errno in _TRANSIENT_ERRNOS:
            return "transient"
        if exc.errno in _MISSING_ERRNOS:
            return "corrupt"
        if type(exc) is OSError and exc.errno is None:
            return "corrupt"
    return None


class DataLoadingError(RuntimeError):
    """Loading failed beyond what retrying and skipping may hide: too many failures in a row, or too many skips.

    It takes a single positional message so that a DataLoader can re-raise it, with its type, from a worker (the
    keyword attributes are then lost; the message carries everything).
    """

    def __init__(
        self,
        msg: str,
        *,
        indices: Sequence[int] = (),
        last_error: BaseException | None = None,
        report: SkipReport | None = None,
    ) -> None:
        super().__init__(msg)
        self.indices = tuple(indices)
        self.last_error = last_error
        self.report = report


@dataclass(frozen=True)
class SkipRecord:
    """One failed load: `index` could not be loaded while serving a request for `requested`.

    `index == requested` marks the example that was skipped (its slot in the batch got a replacement); the other
    records are replacement candidates that failed as well.
    """

    index: int
    requested: int
    kind: Failure
    error_type: str  # the exception's class name
    message: str  # the exception's message, shortened
    attempts: int  # loads tried: 1 for corrupt, retries + 1 for transient failures that never recovered

    @property
    def reason(self) -> str:
        return f"{self.kind}: {self.error_type}"

    def __str__(self) -> str:
        return f"index {self.index}: {self.reason}: {self.message} ({self.attempts} attempt(s))"


class RobustItem(NamedTuple):
    """What `RobustDataset[i]` returns: the wrapped dataset's item plus the records of what went wrong."""

    sample: Any
    skips: tuple[SkipRecord, ...]  # empty when `requested` itself loaded
    retries: int  # transient failures that were retried while serving this item


class RobustBatch(NamedTuple):
    """What `robust_collate(...)` returns: the inner collate's batch plus the batch's records.

    A NamedTuple on purpose: it is pickled from worker to main process as is, and `pin_memory` rebuilds it
    field by field, so the inner batch still gets pinned.
    """

    batch: Any
    skips: tuple[SkipRecord, ...]
    size: int  # examples in the batch
    retries: int


def _describe(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_error_classes(name: str, value: Any) -> tuple[type[BaseException], ...]:
    if not isinstance(value, tuple) or not all(isinstance(c, type) and issubclass(c, BaseException) for c in value):
        raise ValueError(f"{name} must be a tuple of exception classes, got {value!r}")
    return value


class RobustDataset(Dataset):
    """Wraps a map-style dataset: retries transient errors, skips bad examples, never hides a bug.

    `self[i]` returns `RobustItem(sample, skips, retries)`. Transient failures are retried up to `retries` times,
    sleeping `min(max_backoff, backoff * 2**k) * (1 + jitter * U[0, 1))`, capped at `max_backoff`, before retry k.
    An example that stays failing, or is corrupt, is skipped: recorded and replaced by the next index (modulo the
    length), so every request returns one example. More than `max_consecutive_failures` failed examples in a row,
    or every example of the dataset failing, raise `DataLoadingError` naming the indices and the last error.
    Exceptions that `classify` returns None for propagate at once. Override `classify` to change the policy.

    Use it with `collate_fn=robust_collate(...)`, and wrap the DataLoader in `RobustLoader` to count and report.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        retries: int = 3,
        backoff: float = 0.05,
        max_backoff: float = 1.0,
        jitter: float = 0.0,
        transient: tuple[type[BaseException], ...] = TRANSIENT_ERRORS,
        corrupt: tuple[type[BaseException], ...] = CORRUPT_ERRORS,
        max_consecutive_failures: int = 10,
        sleep: Callable[[float], Any] = time.sleep,
    ) -> None:
        if (
            isinstance(dataset, IterableDataset)
            or not hasattr(dataset, "__len__")
            or not hasattr(dataset, "__getitem__")
        ):
            raise ValueError(
                f"dataset must be a map-style dataset with __len__ and __getitem__, got {type(dataset).__name__}"
            )
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        for name, value in (("backoff", backoff), ("max_backoff", max_backoff), ("jitter", jitter)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if max_backoff < backoff:
            raise ValueError(f"max_backoff must be >= backoff={backoff}, got {max_backoff!r}")
        if (
            isinstance(max_consecutive_failures, bool)
            or not isinstance(max_consecutive_failures, int)
            or max_consecutive_failures < 0
        ):
            raise ValueError(f"max_consecutive_failures must be an int >= 0, got {max_consecutive_failures!r}")
        if not callable(sleep):
            raise ValueError(f"sleep must be callable, got {sleep!r}")
        self.dataset = dataset
        self.retries = retries
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.jitter = float(jitter)
        self.transient = _check_error_classes("transient", transient)
        self.corrupt = _check_error_classes("corrupt", corrupt)
        self.max_consecutive_failures = max_consecutive_failures
        self.sleep = sleep

    def __len__(self) -> int:
        return len(self.dataset)

    def classify(self, exc: BaseException) -> Failure | None:
        """Returns "transient", "corrupt" or None (propagate); see `classify_error`."""
        return classify_error(exc, transient=self.transient, corrupt=self.corrupt)

    def delay(self, retry: int) -> float:
        """Seconds to sleep before retry number `retry` (0-based), never more than `max_backoff`."""
        base = self.backoff * 2.0 ** min(retry, 64)
        if self.jitter:
            base *= 1.0 + self.jitter * random.random()  # DataLoader seeds `random` per worker
        return min(self.max_backoff, base)

    def _load(self, index: int, requested: int) -> tuple[Any, int, SkipRecord | None, BaseException | None]:
        """(sample, retries, None, None) on success, (None, retries, record, exception) when skipped."""
        retry = 0
        while True:
            try:
                return self.dataset[index], retry, None, None
            except Exception as exc:
                kind = self.classify(exc)
                if kind is None:
                    raise  # a bug or a system problem: never retried, never counted
                if kind == "transient" and retry < self.retries:
                    self.sleep(self.delay(retry))
                    retry += 1
                    continue
                record = SkipRecord(
                    index=index,
                    requested=requested,
                    kind=kind,
                    error_type=type(exc).__name__,
                    message=_describe(exc),
                    attempts=retry + 1,
                )
                return None, retry, record, exc

    def __getitem__(self, index: int) -> RobustItem:
        index = operator.index(index)
        n = len(self.dataset)
        failures: list[SkipRecord] = []
        retries = 0
        current = index
        while True:
            sample, tried, record, exc = self._load(current, index)
            retries += tried
            if record is None:
                return RobustItem(sample, tuple(failures), retries)
            failures.append(record)
            if len(failures) > self.max_consecutive_failures or len(failures) >= n:
                indices = [r.index for r in failures]
                why = (
                    f"more than max_consecutive_failures={self.max_consecutive_failures}"
                    if len(failures) > self.max_consecutive_failures
                    else f"every example of the dataset (length {n})"
                )
                raise DataLoadingError(
                    f"{len(failures)} examples failed to load in a row ({why}) while serving index {index}: "
                    f"indices {indices}; last error: {record.reason}: {record.message}. The store may be down, "
                    "the data badly damaged, or a path/credential wrong.",
                    indices=indices,
                    last_error=exc,
                ) from exc
            current = (current + 1) % n


class RobustCollate:
    """Collates `RobustItem`s: the samples with `inner`, the records onto a `RobustBatch`.

    A class rather than a closure so that it pickles into DataLoader workers started with "spawn".
    """

    def __init__(self, inner: Callable[[list[Any]], Any] = default_collate) -> None:
        if not callable(inner):
            raise ValueError(f"inner must be a callable collate function, got {inner!r}")
        self.inner = inner

    def __call__(self, items: Sequence[RobustItem] | RobustItem) -> RobustBatch:
        if isinstance(items, RobustItem):  # DataLoader(batch_size=None): one item at a time
            return RobustBatch(self.inner(items.sample), items.skips, 1, items.retries)
        for item in items:
            if not isinstance(item, RobustItem):
                raise ValueError(
                    f"robust_collate expects the RobustItems of a RobustDataset, got {type(item).__name__}; "
                    "wrap the dataset in RobustDataset"
                )
        batch = self.inner([item.sample for item in items])
        skips = tuple(record for item in items for record in item.skips)
        return RobustBatch(batch, skips, len(items), sum(item.retries for item in items))

    def __repr__(self) -> str:
        return f"robust_collate({getattr(self.inner, '__name__', self.inner)!r})"


def robust_collate(inner: Callable[[list[Any]], Any] = default_collate) -> RobustCollate:
    """The collate_fn for a DataLoader over a `RobustDataset`: `inner` collates the samples as usual."""
    return RobustCollate(inner)


@dataclass(frozen=True)
class SkipReport:
    """Skips of one epoch (global over ranks under torch.distributed, except where noted).

    `examples` counts the examples delivered, `skipped` those among them whose requested index failed and was
    replaced, so `fraction = skipped / examples` is the share of the epoch's examples that were bad.
    `failed_loads` also counts replacement candidates that failed; `reasons` splits `failed_loads` by
    "kind: ExceptionType"; `samples` holds a few records (up to `max_samples` per rank).
    """

    epoch: int
    batches: int
    examples: int
    skipped: int
    failed_loads: int
    retries: int
    reasons: dict[str, int] = field(default_factory=dict)
    samples: tuple[SkipRecord, ...] = ()
    complete: bool = False  # True once the epoch ran to its end

    @property
    def fraction(self) -> float:
        return self.skipped / max(self.examples, 1)

    def __str__(self) -> str:
        reasons = ", ".join(f"{k} x{v}" for k, v in sorted(self.reasons.items())) or "none"
        return (
            f"epoch {self.epoch}: skipped {self.skipped} of {self.examples} examples ({100 * self.fraction:.2f}%) "
            f"in {self.batches} batches; {self.failed_loads} failed loads, {self.retries} retries; reasons: {reasons}"
        )


_EXAMPLES, _SKIPPED, _FAILED, _RETRIES, _BATCHES, _STOPPED, _ENDED = range(7)


class _EpochCounts:
    def __init__(self, epoch: int, max_samples: int) -> None:
        self.epoch = epoch
        self.max_samples = max_samples
        self.values = [0] * 7  # indexed by the constants above; also the all-reduced vector
        self.reasons: Counter[str] = Counter()
        self.samples: list[SkipRecord] = []

    def add(self, batch: RobustBatch) -> None:
        skips = tuple(batch.skips)
        self.values[_EXAMPLES] += int(batch.size)
        self.values[_SKIPPED] += sum(r.index == r.requested for r in skips)
        self.values[_FAILED] += len(skips)
        self.values[_RETRIES] += int(batch.retries)
        self.values[_BATCHES] += 1
        self.reasons.update(r.reason for r in skips)
        self.samples.extend(skips[: self.max_samples - len(self.samples)])


class RobustLoader:
    """Iterates a DataLoader built on `RobustDataset` + `robust_collate`; yields the inner collate's batches.

    Counts skipped examples and their reasons per epoch: `epoch_report()` for the epoch in progress,
    `last_report` / `history` for finished ones, and one `logging` line per epoch. Raises `DataLoadingError` once
    the skipped fraction passes `max_skip_fraction`: during the epoch as soon as `min_examples` examples have been
    seen, and at the end of the epoch whatever the count.

    Under torch.distributed the counts are all-reduced (sum) every `sync_every` batches and at the end of the epoch,
    so every rank sees the same totals and all ranks raise at the same batch. A rank whose inner loader raises
    (a bug, or `DataLoadingError` from too many failures in a row) first tells the others at the next sync point,
    and they raise `DataLoadingError` too rather than wait for it forever. That hand-off is only in step with the
    other ranks when `sync_every=1` (the default): with a larger value they may already be in the training step's
    collectives. Ranks are also checked to have the same number of batches when the epoch starts. The counts use a
    Gloo group (`group`, or the default group when it is Gloo, or else a Gloo group made at the first epoch on all
    ranks) so that no CUDA sync is added to the step.
    """

    def __init__(
        self,
        loader: Iterable[RobustBatch],
        *,
        max_skip_fraction: float = 0.1,
        min_examples: int = 100,
        sync_every: int = 1,
        max_samples: int = 5,
        group: Any = None,
    ) -> None:
        if not hasattr(loader, "__iter__"):
            raise ValueError(f"loader must be an iterable of RobustBatch (a DataLoader), got {loader!r}")
        ok = isinstance(max_skip_fraction, (int, float)) and not isinstance(max_skip_fraction, bool)
        if not ok or not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be a number in [0, 1], got {max_skip_fraction!r}")
        limits = {"min_examples": (min_examples, 0), "sync_every": (sync_every, 1), "max_samples": (max_samples, 0)}
        for name, (value, low) in limits.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.loader = loader
        self.max_skip_fraction = float(max_skip_fraction)
        self.min_examples = min_examples
        self.sync_every = sync_every
        self.max_samples = max_samples
        self.group = group
        self.last_report: SkipReport | None = None
        self.history: list[SkipReport] = []
        self._next_epoch = 0
        self._current: _EpochCounts | None = None
        self._synced: list[int] | None = None
        self._gloo: Any = None

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        """Numbers the next epoch, and forwards to the sampler's `set_epoch` (DistributedSampler) if it has one."""
        self._next_epoch = epoch
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def epoch_report(self) -> SkipReport | None:
        """The counts of the epoch in progress (global as of the last sync), or of the last one; None before any."""
        if self._current is None:
            return self.last_report
        return self._report(self._current, self._synced or self._current.values, None, complete=False)

    # -- distributed helpers -------------------------------------------------------------------------------------

    def _resolve_group(self) -> Any:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        if self.group is not None:
            return self.group
        if "gloo" in str(dist.get_backend()).lower():
            return dist.group.WORLD
        if self._gloo is None:  # NCCL default: counts on CPU need their own group; all ranks get here at epoch 0
            try:
                self._gloo = dist.new_group(backend="gloo")
            except Exception:  # pragma: no cover - a build without Gloo: count on the default group
                self._gloo = dist.group.WORLD
        return self._gloo

    @staticmethod
    def _device(group: Any) -> torch.device:
        if "gloo" in str(dist.get_backend(group)).lower():
            return torch.device("cpu")
        return torch.device("cuda", torch.cuda.current_device())  # pragma: no cover

    def _all_reduce(self, group: Any, values: list[int], op: Any = None) -> list[int]:
        tensor = torch.tensor(values, dtype=torch.int64, device=self._device(group))
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=group)
        return tensor.tolist()

    def _sync(self, group: Any, counts: _EpochCounts, *, stopped: bool = False, ended: bool = False) -> list[int]:
        values = list(counts.values)
        values[_STOPPED], values[_ENDED] = int(stopped), int(ended)
        totals = self._all_reduce(group, values)
        self._synced = totals
        world = dist.get_world_size(group)
        if stopped:
            return totals
        if totals[_STOPPED]:
            raise DataLoadingError(
                f"{totals[_STOPPED]} of {world} ranks stopped with an error in epoch {counts.epoch} at batch "
                f"{counts.values[_BATCHES]}; stopping this rank as well so that none waits "
                "for it forever (the cause is in the failing rank's traceback)"
            )
        if totals[_ENDED] not in (0, world):
            raise DataLoadingError(
                f"ranks ran out of batches at different points in epoch {counts.epoch} ({totals[_ENDED]} of {world} "
                f"ended after {counts.values[_BATCHES]} batches on rank {dist.get_rank(group)}); give every rank the "
                "same number of batches (DistributedSampler)"
            )
        return totals

    def _check_lengths(self, group: Any, epoch: int) -> None:
        try:
            n = len(self.loader)  # type: ignore[arg-type]
        except TypeError:
            n = -1
        high, neg_low = self._all_reduce(group, [n, -n], op=dist.ReduceOp.MAX)
        if high != -neg_low:
            raise DataLoadingError(
                f"ranks have different numbers of batches in epoch {epoch}: from {-neg_low} to {high} "
                f"(this rank: {n}); give every rank the same number (DistributedSampler), or the ranks would hang"
            )

    def _gather(self, group: Any, counts: _EpochCounts) -> tuple[Counter[str], list[SkipRecord]]:
        if group is None:
            return Counter(counts.reasons), list(counts.samples)
        parts: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, (dict(counts.reasons), counts.samples), group=group)
        reasons: Counter[str] = Counter()
        samples: list[SkipRecord] = []
        for part_reasons, part_samples in parts:
            reasons.update(part_reasons)
            samples.extend(part_samples)
        return reasons, samples

    # -- reports and the threshold -------------------------------------------------------------------------------

    def _report(
        self,
        counts: _EpochCounts,
        totals: Sequence[int],
        gathered: tuple[Counter[str], list[SkipRecord]] | None,
        *,
        complete: bool,
    ) -> SkipReport:
        reasons, samples = gathered or (counts.reasons, counts.samples)
        return SkipReport(
            epoch=counts.epoch,
            batches=counts.values[_BATCHES],
            examples=totals[_EXAMPLES],
            skipped=totals[_SKIPPED],
            failed_loads=totals[_FAILED],
            retries=totals[_RETRIES],
            reasons=dict(reasons),
            samples=tuple(samples),
            complete=complete,
        )

    def _over(self, totals: Sequence[int], *, final: bool) -> bool:
        examples, skipped = totals[_EXAMPLES], totals[_SKIPPED]
        if examples == 0 or (not final and examples < self.min_examples):
            return False
        return skipped / examples > self.max_skip_fraction

    def _fail(self, group: Any, counts: _EpochCounts, totals: Sequence[int], *, final: bool) -> DataLoadingError:
        report = self._report(counts, totals, self._gather(group, counts), complete=final)
        self.last_report, self._current = report, None
        shown = "; ".join(str(r) for r in report.samples) or "none on record"
        when = "at the end of the epoch" if final else f"after {report.batches} batch(es)"
        msg = (
            f"skipped {report.skipped} of {report.examples} examples seen ({100 * report.fraction:.2f}%) {when} of "
            f"epoch {report.epoch}, more than max_skip_fraction={self.max_skip_fraction} (checked once "
            f"min_examples={self.min_examples} were seen); reasons: "
            + (", ".join(f"{k} x{v}" for k, v in sorted(report.reasons.items())) or "none")
            + f"; for example: {shown}"
        )
        return DataLoadingError(msg, indices=[r.index for r in report.samples], report=report)

    # -- iteration -----------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        epoch = self._next_epoch
        self._next_epoch += 1
        counts = _EpochCounts(epoch, self.max_samples)
        self._current, self._synced = counts, None
        group = self._resolve_group()
        if group is not None:
            self._check_lengths(group, epoch)
        iterator = iter(self.loader)
        while True:
            try:
                item = next(iterator)
                if not isinstance(item, RobustBatch):
                    raise ValueError(
                        f"loader must yield RobustBatch (build the DataLoader on a RobustDataset with "
                        f"collate_fn=robust_collate(...)), got {type(item).__name__}"
                    )
            except StopIteration:
                break
            except Exception:
                if group is not None:  # tell the other ranks, which wait in their next sync, then re-raise
                    try:
                        self._sync(group, counts, stopped=True)
                    except Exception as sync_error:  # the group may be gone already; the original error matters
                        logger.error("could not tell the other ranks that this one stopped: %r", sync_error)
                raise
            counts.add(item)
            if group is None:
                totals: Sequence[int] = counts.values
            elif counts.values[_BATCHES] % self.sync_every == 0:
                totals = self._sync(group, counts)
            else:
                totals = ()
            if totals and self._over(totals, final=False):
                raise self._fail(group, counts, totals, final=False)
            yield item.batch

        totals = counts.values if group is None else self._sync(group, counts, ended=True)
        if self._over(totals, final=True):
            raise self._fail(group, counts, totals, final=True)
        report = self._report(counts, totals, self._gather(group, counts), complete=True)
        self.last_report = report
        self.history.append(report)
        self._current = None
        if group is None or dist.get_rank(group) == 0:
            logger.log(logging.WARNING if report.skipped else logging.INFO, "%s", report)
