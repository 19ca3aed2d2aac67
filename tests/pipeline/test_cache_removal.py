"""A finished cache leaves its place at once and is deleted in the background; what a killed
run left in the trash is deleted by the next stage."""

from __future__ import annotations

from tasks.cache_removal import TRASH, finish_removals, remove_in_background


def _cache(directory, files=3, size=1 << 20):
    directory.mkdir(parents=True)
    for i in range(files):
        (directory / f"shard_{i}.bin").write_bytes(b"\0" * size)
    return directory


def test_a_removed_cache_is_gone_at_once_and_deleted_by_the_end(tmp_path):
    cache_dir = tmp_path / "cache"
    layer = _cache(cache_dir / "activations" / "conv1--abc")
    killed = _cache(cache_dir / TRASH / "conv0--def.4242.0123abcd")  # a killed run's
    remove_in_background(layer, cache_dir)
    assert not layer.exists()  # the next layer's capture never sees it
    remove_in_background(layer, cache_dir)  # already gone: nothing to do
    finish_removals(cache_dir)
    assert list((cache_dir / TRASH).iterdir()) == [] and not killed.exists()
    assert (cache_dir / "activations").is_dir()  # only the layer's directory went
