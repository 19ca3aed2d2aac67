"""Cache checksums: taken over tensor storages in memory, equal to the file's, and a cache
written with another checksum is refused (recomputed), not trusted."""

import io
import json

import pytest
import torch

from adaround_core.calibration import checksum
from adaround_core.calibration.checksum import (
    buffer_checksum,
    file_checksum,
    tree_checksum,
    write_checksummed,
)
from adaround_core.calibration.sample_store import (
    MANIFEST,
    CorruptCacheError,
    read_manifest,
    write_layer_cache,
)


def test_tree_checksum_covers_each_storage_once_in_order():
    base = torch.arange(12, dtype=torch.float32)
    view = base[4:].view(2, 4)  # shares base's storage
    other = torch.ones(3)
    digest = tree_checksum({"a": base, "b": view, "c": (other, 5, None)})
    assert digest == buffer_checksum([base.numpy().tobytes(), other.numpy().tobytes()])
    assert digest != tree_checksum({"c": (other, 5, None), "a": base})  # order counts
    changed = base.clone()
    changed[0] += 1
    assert digest != tree_checksum({"a": changed, "b": view, "c": (other, 5, None)})
    assert tree_checksum({"empty": torch.empty(0), "n": 1}) == buffer_checksum([])


def test_shard_checksum_is_the_file_checksum(tmp_path):
    write_layer_cache(tmp_path, [(torch.randn(3, 4), torch.randn(3, 2))])
    shards = read_manifest(tmp_path, verify=True)
    for shard in shards["inputs"] + shards["targets"]:
        assert shard.checksum == file_checksum(tmp_path / shard.file)
    data = bytearray((tmp_path / shards["targets"][0].file).read_bytes())
    data[5] ^= 1
    (tmp_path / shards["targets"][0].file).write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match="checksum"):
        read_manifest(tmp_path, verify=True)


@pytest.mark.parametrize("size", [0, 1, 10, 16, 33])
def test_a_buffer_written_in_chunks_is_whole_and_its_checksum_the_whole_ones(monkeypatch, size):
    monkeypatch.setattr(checksum, "_CHUNK", 8)  # several chunks, the last one short
    data = torch.arange(size, dtype=torch.float32).numpy()
    file = io.BytesIO()
    digest = write_checksummed(file, data)
    assert file.getvalue() == data.tobytes()
    assert digest == buffer_checksum([data.tobytes()])


def test_manifest_of_another_version_is_refused(tmp_path):
    write_layer_cache(tmp_path, [(torch.randn(3, 4), torch.randn(3, 2))])
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    for shards in manifest.values():  # the SHA-256 manifests of earlier versions
        for shard in shards:
            shard["sha256"] = shard.pop("checksum")
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CorruptCacheError, match="another version"):
        read_manifest(tmp_path, verify=False)
