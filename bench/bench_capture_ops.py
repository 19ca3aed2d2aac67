"""The capture's per-batch operations at 224 px, old form against new (best of repeats, ms).

On a ResNet-18 stem batch (32 x 64 x 112 x 112, float32), with the pipeline's huge pages:
``max_pool2d`` in NCHW against the channels-last form of ``calibration.cpu_kernels``; the
in-place fake quantization whole against chunk by chunk (``quant_math.FAKE_QUANT_CHUNK``);
and gathering 32 random rows of a 1024-row disk shard store into a ``bytearray`` (the old
reader) against ``ShardStore.gather`` (a torch tensor).

    .venv/bin/python -m bench.bench_capture_ops
"""

from __future__ import annotations

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before torch's first allocation

import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from adaround_core.calibration import cpu_kernels  # noqa: E402
from adaround_core.calibration.sample_store import cached_groups, write_layer_cache  # noqa: E402
from adaround_core.quant import quant_math  # noqa: E402

REPEATS = 7


def best_ms(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return round(best * 1e3, 1)


def bytearray_gather(store, index: torch.Tensor) -> torch.Tensor:
    """The reader before this change: rows into a zero-filled ``bytearray``."""
    shard_of = torch.searchsorted(store._starts, index, right=True) - 1
    offsets = (index - store._starts[shard_of]) * store.row_nbytes
    size = store.row_nbytes
    buffer = bytearray(size * len(index))
    view = memoryview(buffer)
    fds = [store._fd(s.file) for s in store.shards]
    for k, (shard, offset) in enumerate(zip(shard_of.tolist(), offsets.tolist(), strict=True)):
        os.preadv(fds[shard], [view[k * size:(k + 1) * size]], offset)
    return torch.frombuffer(buffer, dtype=store.dtype).reshape(len(index), *store.row_shape)


def main() -> int:
    x = torch.relu(torch.randn(32, 64, 112, 112))
    scale, zero = torch.tensor(0.01), torch.tensor(0.0)
    whole = 1 << 40  # a chunk larger than any tensor: the whole-tensor form
    chunked = quant_math.FAKE_QUANT_CHUNK

    def fake_quant(chunk: int) -> Callable[[], object]:
        def run():
            quant_math.FAKE_QUANT_CHUNK = chunk
            try:
                return quant_math._fake_quantize_in_place(x, scale, zero, 0, 255)
            finally:
                quant_math.FAKE_QUANT_CHUNK = chunked
        return run

    results = {
        "max_pool2d_nchw_ms": best_ms(lambda: F.max_pool2d(x, 3, 2, 1)),
        "max_pool2d_channels_last_ms": best_ms(lambda: cpu_kernels.max_pool2d(x, 3, 2, 1)),
        "fake_quant_whole_ms": best_ms(fake_quant(whole)),
        "fake_quant_chunked_ms": best_ms(fake_quant(chunked)),
    }
    with tempfile.TemporaryDirectory(dir="bench") as tmp:
        torch.manual_seed(0)
        write_layer_cache(Path(tmp), ((x, x) for _ in range(1024 // 32)))
        (_, targets), = cached_groups(Path(tmp))
        generator = torch.Generator().manual_seed(0)
        index = lambda: torch.randint(1024, (32,), generator=generator)  # noqa: E731
        results["gather_bytearray_ms"] = best_ms(lambda: bytearray_gather(targets, index()))
        results["gather_tensor_ms"] = best_ms(lambda: targets.gather(index()))
        targets.close()
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
