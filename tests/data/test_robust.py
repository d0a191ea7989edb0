"""Tests for cvzoo/data/robust.py against a simulated flaky remote store (PNG images + JSON annotations)."""

from __future__ import annotations

import errno
import io
import json
import logging
import multiprocessing
import queue as queue_module
import random
import socket
import time
import traceback
import urllib.error
import zlib
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, default_convert
from torch.utils.data.distributed import DistributedSampler

from cvzoo.data.robust import (
    DataLoadingError,
    RobustBatch,
    RobustDataset,
    RobustItem,
    RobustLoader,
    SkipRecord,
    classify_error,
    robust_collate,
)

# -- the simulated store ----------------------------------------------------------------------------------------------


def _png(i: int, size: int = 8) -> bytes:
    pixels = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
    pixels[0, 0, 0] = i % 256  # the image says which example it is
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


class FlakyStore:
    """In-memory object store: PNG images and JSON annotations, with outages, lost and damaged objects.

    Every `get` fails with ConnectionError or TimeoutError with probability `p_fail` (seeded; `injected` counts
    them); keys in `always_fail` time out on every get; `lost` images are gone (FileNotFoundError), `truncated`
    images are cut in half (a PIL decode error), `bad_json` annotations are cut short (JSONDecodeError).
    """

    def __init__(self, n, *, seed=0, p_fail=0.0, lost=(), truncated=(), bad_json=(), always_fail=()):
        self.blobs = {}
        for i in range(n):
            self.blobs[f"img/{i}.png"] = _png(i)
            self.blobs[f"ann/{i}.json"] = json.dumps({"label": i}).encode()
        for i in lost:
            del self.blobs[f"img/{i}.png"]
        for i in truncated:
            self.blobs[f"img/{i}.png"] = self.blobs[f"img/{i}.png"][: len(self.blobs[f"img/{i}.png"]) // 2]
        for i in bad_json:
            self.blobs[f"ann/{i}.json"] = b'{"label": '
        self.broken = set(lost) | set(truncated) | set(bad_json)  # the ground truth
        self.always_fail = set(always_fail)
        self.p_fail = p_fail
        self.rng = random.Random(seed)
        self.injected = 0

    def get(self, key: str) -> bytes:
        if key in self.always_fail:
            raise TimeoutError(f"simulated timeout reading {key}")
        if self.p_fail and self.rng.random() < self.p_fail:
            self.injected += 1
            error = ConnectionResetError if self.rng.random() < 0.5 else TimeoutError
            raise error(f"simulated outage reading {key}")
        try:
            return self.blobs[key]
        except KeyError:
            raise FileNotFoundError(errno.ENOENT, "no such object", key) from None


class StoreDataset(Dataset):
    """Decodes example i: (image (3, 8, 8) uint8, label int) from `img/i.png` and `ann/i.json`."""

    def __init__(self, store: FlakyStore, n: int) -> None:
        self.store = store
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} examples")
        with Image.open(io.BytesIO(self.store.get(f"img/{i}.png"))) as img:
            pixels = np.asarray(img.convert("RGB"))
        label = json.loads(self.store.get(f"ann/{i}.json"))["label"]
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1), label


def _served(broken: set[int], n: int, requested: int) -> tuple[int, int]:
    """(index delivered for `requested`, failed loads on the way): the next index that is not broken."""
    i, failed = requested, 0
    while i in broken:
        i, failed = (i + 1) % n, failed + 1
    return i, failed


def _robust(store, n, **kwargs) -> RobustDataset:
    kwargs.setdefault("sleep", lambda seconds: None)
    return RobustDataset(StoreDataset(store, n), **kwargs)


def _loader(dataset, *, batch_size=4, num_workers=0, **kwargs) -> RobustLoader:
    inner = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=robust_collate())
    return RobustLoader(inner, **kwargs)


# -- classification ---------------------------------------------------------------------------------------------------


class _LibraryOSError(OSError):
    """An OSError subclass from some library, without errno: not ours to guess."""


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ConnectionResetError("reset by peer"), "transient"),
        (TimeoutError("read timed out"), "transient"),
        (socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"), "transient"),
        (OSError(errno.EIO, "Input/output error"), "transient"),
        (OSError(errno.ETIMEDOUT, "Connection timed out"), "transient"),
        (OSError(errno.ESTALE, "Stale file handle"), "transient"),
        (BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable"), "transient"),
        (urllib.error.HTTPError("http://store/x", 503, "Service Unavailable", {}, None), "transient"),
        (urllib.error.URLError(ConnectionRefusedError("refused")), "transient"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory"), "corrupt"),
        (PermissionError(errno.EACCES, "Permission denied"), "corrupt"),
        (OSError("image file is truncated"), "corrupt"),
        (OSError("broken data stream when reading image file"), "corrupt"),
        (UnidentifiedImageError("cannot identify image file"), "corrupt"),
        (json.JSONDecodeError("Expecting value", "{", 1), "corrupt"),
        (EOFError("Ran out of input"), "corrupt"),
        (zlib.error("Error -3 while decompressing data"), "corrupt"),
        (urllib.error.HTTPError("http://store/x", 404, "Not Found", {}, None), "corrupt"),
        (urllib.error.HTTPError("http://store/x", 403, "Forbidden", {}, None), None),
        (urllib.error.URLError("unknown url type: s4"), None),
        (OSError(errno.EMFILE, "Too many open files"), None),
        (OSError(errno.ENOSPC, "No space left on device"), None),
        (_LibraryOSError("something"), None),
        (KeyError("label"), None),
        (TypeError("unsupported operand"), None),
        (AttributeError("no attribute"), None),
        (IndexError("list index out of range"), None),
        (ValueError("bad value"), None),
        (ZeroDivisionError("division by zero"), None),
        (AssertionError(), None),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_classify_error(exc, expected):
    assert classify_error(exc) == expected


def test_store_ground_truth_really_is_broken():
    store = FlakyStore(4, lost=[0], truncated=[1], bad_json=[2])
    data = StoreDataset(store, 4)
    for i, error in ((0, FileNotFoundError), (1, OSError), (2, json.JSONDecodeError)):
        with pytest.raises(error):
            data[i]
    assert data[3][1] == 3


# -- retries ----------------------------------------------------------------------------------------------------------


def test_transient_failures_are_recovered_by_retries():
    n = 24
    store = FlakyStore(n, seed=1, p_fail=0.3)
    sleeps: list[float] = []
    ds = _robust(store, n, retries=20, backoff=0.01, max_backoff=0.04, sleep=sleeps.append)
    items = [ds[i] for i in range(n)]
    assert all(isinstance(item, RobustItem) and item.skips == () for item in items)
    assert [item.sample[1] for item in items] == list(range(n))
    assert [int(item.sample[0][0, 0, 0]) for item in items] == list(range(n))
    assert store.injected > 5
    assert sum(item.retries for item in items) == store.injected == len(sleeps)
    assert max(sleeps) <= 0.04
    assert set(sleeps) <= {0.01, 0.02, 0.04}


def test_backoff_is_exponential_bounded_and_exhausted_retries_skip():
    n = 6
    store = FlakyStore(n, always_fail=["img/2.png"])
    sleeps: list[float] = []
    ds = _robust(store, n, retries=5, backoff=0.01, max_backoff=0.05, sleep=sleeps.append)
    item = ds[2]
    assert sleeps == pytest.approx([0.01, 0.02, 0.04, 0.05, 0.05])
    assert item.sample[1] == 3  # replaced by the next index
    assert item.retries == 5
    (record,) = item.skips
    assert (record.index, record.requested, record.kind, record.error_type, record.attempts) == (
        2,
        2,
        "transient",
        "TimeoutError",
        6,
    )

    jittered = _robust(store, n, retries=3, backoff=0.01, max_backoff=0.03, jitter=0.5)
    delays = [jittered.delay(k) for k in range(4) for _ in range(20)]
    assert min(delays) >= 0.01 and max(delays) <= 0.03


# -- skipping, counting, reporting ------------------------------------------------------------------------------------


def test_broken_examples_are_skipped_counted_exactly_and_replaced(caplog):
    n = 40
    store = FlakyStore(n, seed=3, p_fail=0.2, lost=[3, 17], truncated=[4, 25], bad_json=[31])
    sleeps: list[float] = []
    ds = _robust(store, n, retries=30, backoff=0.001, max_backoff=0.004, sleep=sleeps.append)
    loader = _loader(ds, max_skip_fraction=0.2, min_examples=1000, max_samples=20)
    assert len(loader) == len(loader.loader) == 10
    expected_labels = [_served(store.broken, n, i)[0] for i in range(n)]
    expected_failed = sum(_served(store.broken, n, i)[1] for i in range(n))  # 3 -> 4 -> 5 fails twice: 6 in all

    with caplog.at_level(logging.INFO, logger="cvzoo.data.robust"):
        for epoch in range(2):
            injected_before = store.injected
            batches = list(loader)
            assert len(batches) == len(loader)
            assert all(images.shape == (4, 3, 8, 8) and labels.shape == (4,) for images, labels in batches)
            assert torch.cat([labels for _, labels in batches]).tolist() == expected_labels
            assert torch.cat([images[:, 0, 0, 0] for images, _ in batches]).tolist() == expected_labels

            report = loader.last_report
            assert report is loader.epoch_report() is loader.history[-1]
            assert report.complete and report.epoch == epoch and report.batches == 10
            assert report.examples == n
            assert report.skipped == len(store.broken) == 5
            assert report.fraction == pytest.approx(5 / 40)
            assert report.failed_loads == expected_failed == 6
            skipped = {r.index for r in report.samples if r.index == r.requested}
            assert skipped == store.broken
            assert sum(report.reasons.values()) == report.failed_loads
            assert report.reasons["corrupt: FileNotFoundError"] == 2
            assert report.reasons["corrupt: JSONDecodeError"] == 1
            assert set(report.reasons) <= {
                "corrupt: FileNotFoundError",
                "corrupt: JSONDecodeError",
                "corrupt: OSError",
                "corrupt: UnidentifiedImageError",
            }
            assert report.retries == store.injected - injected_before > 0  # every outage was retried

    assert [r.epoch for r in loader.history] == [0, 1]
    assert max(sleeps) <= 0.004
    lines = [r for r in caplog.records if r.name == "cvzoo.data.robust"]
    assert len(lines) == 2 and all(r.levelno == logging.WARNING for r in lines)
    assert "skipped 5 of 40 examples (12.50%)" in lines[0].getMessage()


def test_clean_epoch_logs_info(caplog):
    n = 8
    with caplog.at_level(logging.INFO, logger="cvzoo.data.robust"):
        loader = _loader(_robust(FlakyStore(n), n))
        assert loader.epoch_report() is None
        list(loader)
    assert loader.last_report.skipped == 0 and loader.last_report.examples == 8
    (line,) = [r for r in caplog.records if r.name == "cvzoo.data.robust"]
    assert line.levelno == logging.INFO and "skipped 0 of 8" in line.getMessage()


def test_skip_fraction_over_threshold_raises_with_a_clear_message():
    n = 40
    broken = list(range(1, n, 4))  # 25% of the examples, one in every batch of 4
    store = FlakyStore(n, lost=broken)
    loader = _loader(_robust(store, n), max_skip_fraction=0.1, min_examples=8)
    seen = []
    with pytest.raises(DataLoadingError) as info:
        for batch in loader:
            seen.append(batch)
    assert len(seen) == 1  # checked once 8 examples were seen: after the second batch
    message = str(info.value)
    for part in (
        "skipped 2 of 8 examples seen (25.00%)",
        "max_skip_fraction=0.1",
        "min_examples=8",
        "corrupt: FileNotFoundError x2",
        "index 1: corrupt: FileNotFoundError",
        "index 5: corrupt: FileNotFoundError",
    ):
        assert part in message
    assert info.value.report is loader.last_report
    assert info.value.report.skipped == 2 and not info.value.report.complete
    assert info.value.indices == (1, 5)


def test_fraction_is_checked_at_the_end_of_the_epoch_whatever_min_examples():
    n = 8
    loader = _loader(_robust(FlakyStore(n, lost=[2]), n), max_skip_fraction=0.1, min_examples=1000)
    seen = []
    with pytest.raises(DataLoadingError, match=r"skipped 1 of 8 examples seen \(12.50%\) at the end of the epoch"):
        for batch in loader:
            seen.append(batch)
    assert len(seen) == 2


def test_too_many_failures_in_a_row_raise():
    n = 16
    store = FlakyStore(n, lost=range(5, 10))
    strict = _robust(store, n, max_consecutive_failures=3)
    assert strict[4].sample[1] == 4
    with pytest.raises(DataLoadingError) as info:
        strict[5]
    message = str(info.value)
    assert "indices [5, 6, 7, 8]" in message and "max_consecutive_failures=3" in message
    assert "FileNotFoundError" in message
    assert info.value.indices == (5, 6, 7, 8)
    assert isinstance(info.value.__cause__, FileNotFoundError)

    lenient = _robust(store, n, max_consecutive_failures=5)
    item = lenient[5]
    assert item.sample[1] == 10 and [r.index for r in item.skips] == [5, 6, 7, 8, 9]

    with pytest.raises(DataLoadingError, match="every example of the dataset"):
        _robust(FlakyStore(3, lost=range(3)), 3)[1]


def test_too_many_failures_in_a_row_raise_through_the_loader():
    n = 16
    loader = _loader(_robust(FlakyStore(n, lost=range(4, 12)), n, max_consecutive_failures=3), max_skip_fraction=1.0)
    with pytest.raises(DataLoadingError, match="max_consecutive_failures=3"):
        list(loader)


# -- bugs are never hidden --------------------------------------------------------------------------------------------


class BuggyDataset(Dataset):
    """Raises a programming error for some indices, as a bug in a decoding function would."""

    def __init__(self, n: int, bugs: dict[int, type[BaseException]]) -> None:
        self.n, self.bugs, self.calls = n, bugs, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        self.calls.append(i)
        if i in self.bugs:
            raise self.bugs[i](f"bug while decoding example {i}")
        return torch.full((2,), float(i)), i


@pytest.mark.parametrize("error", [KeyError, TypeError, AttributeError, ZeroDivisionError, AssertionError])
def test_programming_errors_propagate_at_once(error):
    sleeps: list[float] = []
    buggy = BuggyDataset(8, {3: error})
    ds = RobustDataset(buggy, sleep=sleeps.append)
    with pytest.raises(error, match="bug while decoding example 3"):
        ds[3]
    assert buggy.calls == [3] and sleeps == []  # not retried, not replaced

    buggy.calls.clear()
    loader = _loader(ds, max_skip_fraction=1.0)
    with pytest.raises(error, match="bug while decoding example 3"):
        list(loader)
    assert buggy.calls == [0, 1, 2, 3]
    assert loader.last_report is None and loader.history == []  # nothing counted as a skip


def test_system_errors_and_bad_indices_propagate():
    ds = RobustDataset(BuggyDataset(8, {2: lambda msg: OSError(errno.EMFILE, "Too many open files")}))
    with pytest.raises(OSError, match="Too many open files"):
        ds[2]
    with pytest.raises(IndexError):
        RobustDataset(StoreDataset(FlakyStore(4), 4))[4]


def test_loader_rejects_plain_batches():
    loader = RobustLoader(DataLoader(BuggyDataset(8, {}), batch_size=4))
    with pytest.raises(ValueError, match="robust_collate"):
        list(loader)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"retries": -1}, "retries"),
        ({"backoff": -0.1}, "backoff"),
        ({"backoff": 0.5, "max_backoff": 0.1}, "max_backoff"),
        ({"max_consecutive_failures": -1}, "max_consecutive_failures"),
        ({"transient": [ConnectionError]}, "transient"),
        ({"corrupt": (FileNotFoundError, "x")}, "corrupt"),
        ({"sleep": 1.0}, "sleep"),
    ],
)
def test_dataset_validates_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RobustDataset(BuggyDataset(4, {}), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"max_skip_fraction": 1.5}, "max_skip_fraction"), ({"min_examples": -1}, "min_examples"),
     ({"sync_every": 0}, "sync_every")],
)  # fmt: skip
def test_loader_validates_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RobustLoader([], **kwargs)


def test_collate_without_batching():
    record = SkipRecord(index=1, requested=1, kind="corrupt", error_type="EOFError", message="", attempts=1)
    batch = robust_collate(default_convert)(RobustItem(torch.ones(2), (record,), 2))  # DataLoader(batch_size=None)
    assert isinstance(batch, RobustBatch) and batch.size == 1 and batch.skips == (record,) and batch.retries == 2


# -- DataLoader workers -----------------------------------------------------------------------------------------------


def test_counts_are_right_with_worker_processes():
    n = 48
    store = FlakyStore(n, seed=5, p_fail=0.2, lost=[0, 13, 14], truncated=[30], bad_json=[47])
    ds = _robust(store, n, retries=30, backoff=0.0005, max_backoff=0.002, sleep=time.sleep)
    loader = _loader(ds, num_workers=2, max_skip_fraction=0.5, min_examples=0, max_samples=20)
    batches = list(loader)
    assert len(batches) == len(loader) == 12 and all(labels.shape == (4,) for _, labels in batches)
    assert torch.cat([labels for _, labels in batches]).tolist() == [_served(store.broken, n, i)[0] for i in range(n)]
    report = loader.last_report
    assert report.examples == n and report.skipped == len(store.broken) == 5
    assert report.failed_loads == sum(_served(store.broken, n, i)[1] for i in range(n)) == 7  # 13->14->15, 47->0->1
    assert {r.index for r in report.samples if r.index == r.requested} == store.broken
    assert report.retries > 0 and store.injected == 0  # the outages happened in the workers' copies of the store


# -- torch.distributed ------------------------------------------------------------------------------------------------

_DDP_N = 32  # 16 examples a rank: rank 0 gets the even indices, rank 1 the odd ones


def _ddp_scenario(rank: int, world: int, *, lost=(), bugs=None, max_skip_fraction=0.25) -> dict:
    if bugs:
        data: Dataset = BuggyDataset(_DDP_N, bugs)
    else:
        data = StoreDataset(FlakyStore(_DDP_N, lost=lost), _DDP_N)
    ds = RobustDataset(data, sleep=lambda seconds: None)
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False)
    inner = DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=robust_collate())
    loader = RobustLoader(inner, max_skip_fraction=max_skip_fraction, min_examples=0)
    out: dict = {"batches": 0, "error": None, "len": len(loader)}
    try:
        for batch in loader:
            assert len(batch[1]) == 4
            dist.all_reduce(torch.ones(1))  # the training step's gradient sync: a rank missing from it hangs the rest
            out["batches"] += 1
    except Exception as exc:
        out["error"], out["message"] = type(exc).__name__, str(exc)
    report = loader.last_report
    out["skipped"] = None if report is None else report.skipped
    out["examples"] = None if report is None else report.examples
    return out


def _ddp_worker(rank: int, world: int, port: int, results) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=10),  # a collective nobody answers errors out instead of hanging
        )
        try:
            odd = [2 * p + 1 for p in range(16)]  # the indices of rank 1
            out = {
                # rank 1 loses 6 of its 16 examples (37.5% locally), 6 of 32 globally (18.75% < 25%)
                "under": _ddp_scenario(rank, world, lost=[odd[p] for p in (1, 4, 6, 9, 12, 14)]),
                # rank 1 loses 12 of 16: 4 of 8 globally after the first batch
                "over": _ddp_scenario(rank, world, lost=odd[:12]),
                # a bug on rank 1 in its second batch
                "bug": _ddp_scenario(rank, world, bugs={odd[5]: KeyError}),
            }
        finally:
            dist.destroy_process_group()
        results.put((rank, out))
    except BaseException:
        results.put((rank, {"crash": traceback.format_exc()}))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_ranks_agree_and_stop_together():
    world, deadline = 2, time.monotonic() + 40.0
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(rank, world, port, results), daemon=True) for rank in range(world)]
    for proc in procs:
        proc.start()
    out: dict[int, dict] = {}
    try:
        while len(out) < world:
            rank, result = results.get(timeout=max(deadline - time.monotonic(), 0.1))
            out[rank] = result
    except queue_module.Empty:
        pytest.fail(f"DDP ranks hung: results from ranks {sorted(out)} only")
    finally:
        for proc in procs:
            proc.join(timeout=max(deadline - time.monotonic(), 1.0))
            if proc.is_alive():
                proc.kill()
                proc.join()
    for rank in range(world):
        assert "crash" not in out[rank], out[rank].get("crash")

    under = [out[rank]["under"] for rank in range(world)]
    assert [u["error"] for u in under] == [None, None], under
    assert [u["batches"] for u in under] == [4, 4] == [u["len"] for u in under]
    assert [u["skipped"] for u in under] == [6, 6]  # the global total on both ranks
    assert [u["examples"] for u in under] == [32, 32]

    over = [out[rank]["over"] for rank in range(world)]
    assert [o["error"] for o in over] == ["DataLoadingError", "DataLoadingError"], over
    assert [o["batches"] for o in over] == [0, 0]
    assert all("skipped 4 of 8 examples seen (50.00%)" in o["message"] for o in over)

    bug = [out[rank]["bug"] for rank in range(world)]
    assert bug[1]["error"] == "KeyError" and "bug while decoding example 11" in bug[1]["message"]
    assert bug[0]["error"] == "DataLoadingError" and "1 of 2 ranks stopped" in bug[0]["message"]
    assert [b["batches"] for b in bug] == [1, 1]


def test_set_epoch_numbers_reports_and_reaches_the_sampler():
    ds = RobustDataset(BuggyDataset(8, {}))
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True)
    loader = RobustLoader(DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=robust_collate()))
    loader.set_epoch(3)
    assert sampler.epoch == 3
    assert sorted(torch.cat([labels for _, labels in loader]).tolist()) == list(range(8))
    assert loader.last_report.epoch == 3 and len(loader) == 2
