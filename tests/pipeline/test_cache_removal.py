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


def test_read_frontier_files_are_unlinked_by_the_background_remover(tmp_path):
    """A consumed frontier file is gone once the removals are waited for; one already
    missing is no error."""
    from tasks.cache_removal import unlink_in_background, wait_for_removals

    files = [tmp_path / f"frontier_{i}.pt" for i in range(3)]
    for file in files:
        file.write_bytes(b"\0" * 1024)
    for file in files:
        unlink_in_background(file)
    unlink_in_background(tmp_path / "never_written.pt")
    wait_for_removals()
    assert list(tmp_path.iterdir()) == []


def _boundary(directory, held_value):
    """A published-looking frontier boundary whose one frontier is held in this process."""
    import json

    import torch

    from adaround_core.calibration.frontier_store import FRONTIER_MANIFEST
    from adaround_core.calibration.held_frontiers import HELD_FRONTIERS
    from adaround_core.calibration.segmented_forward import Frontier

    token = HELD_FRONTIERS.new_token()
    assert HELD_FRONTIERS.offer(token, 0, Frontier(0, {"x": torch.full((4,), held_value)}),
                                budget=1 << 40)
    (directory / "quant").mkdir(parents=True)
    (directory / "quant" / FRONTIER_MANIFEST).write_text(json.dumps({"files": [{"held": token}]}))
    return token


def test_a_boundary_deleted_on_publishing_lets_go_of_its_held_frontiers(tmp_path):
    """When another process published the same boundary first, ours is deleted and its
    held frontiers released; an invalid one in the way is replaced and released too."""
    from adaround_core.calibration.held_frontiers import HELD_FRONTIERS
    from tasks.activation_cache import _publish

    ours, theirs = tmp_path / ".b.tmp-1", tmp_path / "b"
    our_token, their_token = _boundary(ours, 1.0), _boundary(theirs, 2.0)
    _publish(ours, theirs, valid=lambda _: True)
    assert not ours.exists() and not HELD_FRONTIERS.holds(our_token, 0)
    assert HELD_FRONTIERS.holds(their_token, 0)
    ours = tmp_path / ".b.tmp-2"
    our_token = _boundary(ours, 3.0)
    _publish(ours, theirs, valid=lambda _: False)
    assert not HELD_FRONTIERS.holds(their_token, 0) and HELD_FRONTIERS.holds(our_token, 0)
    assert not ours.exists() and (theirs / "quant").is_dir()
    HELD_FRONTIERS.drop({our_token})
