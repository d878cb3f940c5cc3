"""RecordStore: shards, manifest, resume, and the errors a user meets."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from analysis.records import Records, RecordsError, RecordStore

L, V = 4, 9


def manifest(**over: object) -> dict:
    m = {
        "model": {"name": "tiny-llava", "source": "/models/tiny"},
        "data": {"task": "shapes", "split": "calib"},
        "reducer": "mean",
        "num_layers": L,
        "num_vision": V,
        "versions": {"torch": torch.__version__, "transformers": "5.23", "toolkit": "0.1.0"},
    }
    m.update(over)
    return m


def batch(start: int, n: int, seed: int = 0) -> tuple[list[str], torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed + start)
    ids = [f"s{i:04d}" for i in range(start, start + n)]
    t2v = torch.rand(n, L, V, generator=g)  # [N, L, V]
    scalars = {"vision_share": torch.rand(n, L, generator=g), "prior_entropy": torch.rand(n, L, generator=g)}
    return ids, t2v, scalars


def write_all(store: RecordStore, sizes: list[int], start: int = 0) -> None:
    for n in sizes:
        store.write_shard(*batch(start, n))
        start += n


def test_write_reopen_and_done_ids(tmp_path: Path) -> None:
    store = RecordStore.create_or_resume(tmp_path / "run", manifest())
    write_all(store, [3, 2, 4])
    assert sorted(p.name for p in (tmp_path / "run" / "shards").iterdir()) == [
        "shard-00000.pt",
        "shard-00001.pt",
        "shard-00002.pt",
    ]
    reopened = RecordStore.open(tmp_path / "run")
    assert reopened.done_ids() == {f"s{i:04d}" for i in range(9)}
    rec = reopened.load()
    assert isinstance(rec, Records)
    assert rec.ids == [f"s{i:04d}" for i in range(9)]
    assert rec.t2v.shape == (9, L, V) and rec.t2v.dtype == torch.float32
    assert set(rec.scalars) == {"vision_share", "prior_entropy"}
    assert rec.scalars["vision_share"].shape == (9, L)
    # values survive the round trip, in writing order
    _, t2v1, sc1 = batch(3, 2)
    assert torch.equal(rec.t2v[3:5], t2v1)
    assert torch.equal(rec.scalars["prior_entropy"][3:5], sc1["prior_entropy"])
    assert torch.allclose(rec.mean_t2v(), rec.t2v.mean(0))
    assert rec.manifest["reducer"] == "mean"
    parts = list(reopened.iter_shards())
    assert [len(p) for p in parts] == [3, 2, 4]
    assert torch.equal(torch.cat([p.t2v for p in parts]), rec.t2v)


def test_resume_equals_single_run(tmp_path: Path) -> None:
    all_ids = [f"s{i:04d}" for i in range(10)]
    one = RecordStore.create_or_resume(tmp_path / "one", manifest())
    write_all(one, [4, 3, 3])

    first = RecordStore.create_or_resume(tmp_path / "two", manifest())
    write_all(first, [4, 3])
    del first  # "interrupt"
    resumed = RecordStore.create_or_resume(tmp_path / "two", manifest())
    todo = [i for i in all_ids if i not in resumed.done_ids()]
    assert todo == all_ids[7:]
    resumed.write_shard(*batch(7, 3))

    a, b = RecordStore.open(tmp_path / "one").load(), RecordStore.open(tmp_path / "two").load()
    assert a.ids == b.ids
    assert torch.equal(a.t2v, b.t2v)
    assert all(torch.equal(a.scalars[k], b.scalars[k]) for k in a.scalars)


def test_corrupt_shard_names_file_and_remedy(tmp_path: Path) -> None:
    store = RecordStore.create_or_resume(tmp_path, manifest())
    write_all(store, [2, 2])
    bad = tmp_path / "shards" / "shard-00001.pt"
    bad.write_bytes(bad.read_bytes()[:50])  # truncated
    with pytest.raises(RecordsError, match=r"shard-00001\.pt is unreadable.*delete .* rerun"):
        RecordStore.open(tmp_path).load()
    with pytest.raises(RecordsError, match=r"shard-00001\.pt"):
        RecordStore.create_or_resume(tmp_path, manifest())
    # following the advice works: delete the file, resume, the lost samples are to be collected again
    bad.unlink()
    with pytest.raises(RecordsError, match=r"shard-00001\.pt is listed .* but missing"):
        RecordStore.open(tmp_path).load()
    resumed = RecordStore.create_or_resume(tmp_path, manifest())
    assert resumed.done_ids() == {"s0000", "s0001"}
    resumed.write_shard(*batch(2, 2))
    assert RecordStore.open(tmp_path).load().ids == ["s0000", "s0001", "s0002", "s0003"]


def test_shard_with_wrong_shape_or_ids_is_corrupt(tmp_path: Path) -> None:
    store = RecordStore.create_or_resume(tmp_path, manifest())
    write_all(store, [2])
    path = tmp_path / "shards" / "shard-00000.pt"
    ids, t2v, sc = batch(0, 2)
    torch.save({"ids": ids, "t2v": t2v[:, :, :5], "scalars": sc}, path)
    with pytest.raises(RecordsError, match=r"shard-00000\.pt is corrupt: t2v has shape \(2, 4, 5\)"):
        RecordStore.open(tmp_path).load()
    torch.save({"ids": ["x", "y"], "t2v": t2v, "scalars": sc}, path)
    with pytest.raises(RecordsError, match=r"corrupt: its ids differ"):
        RecordStore.open(tmp_path).load()


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(RecordsError, match=r"manifest\.json does not exist.*analysis\.collect"):
        RecordStore.open(tmp_path)


def test_shards_without_manifest_are_not_discarded(tmp_path: Path) -> None:
    store = RecordStore.create_or_resume(tmp_path, manifest())
    write_all(store, [2])
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(RecordsError, match="holds 1 shard files .* no manifest.json"):
        RecordStore.create_or_resume(tmp_path, manifest())
    assert (tmp_path / "shards" / "shard-00000.pt").is_file()


def test_empty_store_load(tmp_path: Path) -> None:
    RecordStore.create_or_resume(tmp_path, manifest())
    with pytest.raises(RecordsError, match="holds no records yet"):
        RecordStore.open(tmp_path).load()


@pytest.mark.parametrize(
    "field,value",
    [
        ("model", {"name": "llava-1.5-7b", "source": "hub"}),
        ("data", {"task": "mme", "split": "test"}),
        ("reducer", "last_token"),
        ("num_layers", L + 1),
        ("num_vision", 16),
    ],
)
def test_manifest_of_another_run(tmp_path: Path, field: str, value: object) -> None:
    RecordStore.create_or_resume(tmp_path, manifest())
    with pytest.raises(RecordsError, match=rf"was made for {field} .*, not .*use a new directory"):
        RecordStore.create_or_resume(tmp_path, manifest(**{field: value}))


def test_versions_may_differ_on_resume(tmp_path: Path) -> None:
    RecordStore.create_or_resume(tmp_path, manifest(data={"task": "shapes", "split": "calib", "sizes": (1, 2)}))
    # a tuple and the list it reads back as are the same identity
    RecordStore.create_or_resume(tmp_path, manifest(data={"task": "shapes", "split": "calib", "sizes": [1, 2]}))
    RecordStore.create_or_resume(tmp_path, manifest(data={"task": "shapes", "split": "calib", "sizes": (1, 2)},
                                                    versions={"torch": "9", "transformers": "9", "toolkit": "9"}))


def test_leftover_temporary_and_unlisted_files_are_cleaned(tmp_path: Path) -> None:
    store = RecordStore.create_or_resume(tmp_path, manifest())
    write_all(store, [2])
    shards = tmp_path / "shards"
    tmp_file = shards / f".shard-00001.pt.tmp-{os.getpid() + 1}"
    tmp_file.write_bytes(b"half a shard")
    orphan = shards / "shard-00001.pt"  # moved into place, but the manifest update never happened
    ids, t2v, sc = batch(2, 2)
    torch.save({"ids": ids, "t2v": t2v, "scalars": sc}, orphan)
    (tmp_path / f".manifest.json.tmp-{os.getpid() + 1}").write_text("{")

    assert RecordStore.open(tmp_path).load().ids == ["s0000", "s0001"]  # readers ignore them
    resumed = RecordStore.create_or_resume(tmp_path, manifest())
    assert not tmp_file.exists() and not orphan.exists()
    assert not list(tmp_path.glob(".manifest.json.tmp*"))
    assert resumed.done_ids() == {"s0000", "s0001"}
    resumed.write_shard(ids, t2v, sc)
    assert RecordStore.open(tmp_path).load().ids == ["s0000", "s0001", "s0002", "s0003"]


def test_manifest_is_valid_json_listing_shards(tmp_path: Path) -> None:
    store = RecordStore.create_or_resume(tmp_path, manifest())
    write_all(store, [2, 1])
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["file"] for s in m["shards"]] == ["shard-00000.pt", "shard-00001.pt"]
    assert [s["ids"] for s in m["shards"]] == [["s0000", "s0001"], ["s0002"]]
    assert m["scalar_names"] == ["prior_entropy", "vision_share"]


def test_write_validation(tmp_path: Path) -> None:
    store = RecordStore.create_or_resume(tmp_path, manifest())
    ids, t2v, sc = batch(0, 2)
    with pytest.raises(RecordsError, match=r"t2v has shape \(2, 4, 8\); expected \[N=2, L=4, V=9\]"):
        store.write_shard(ids, t2v[..., :8], sc)
    with pytest.raises(RecordsError, match=r"scalars\['vision_share'\] has shape"):
        store.write_shard(ids, t2v, {**sc, "vision_share": sc["vision_share"][:, :2]})
    with pytest.raises(RecordsError, match="non-finite"):
        store.write_shard(ids, t2v.clone().fill_(float("nan")), sc)
    store.write_shard(ids, t2v.numpy(), {k: v.numpy() for k, v in sc.items()})  # numpy is fine
    with pytest.raises(RecordsError, match="already stored"):
        store.write_shard(ids, t2v, sc)
    with pytest.raises(RecordsError, match="scalars are .*earlier shards have"):
        store.write_shard(["s9"], t2v[:1], {"vision_share": sc["vision_share"][:1]})
    with pytest.raises(RecordsError, match="read-only"):
        RecordStore.open(tmp_path).write_shard(["s8"], t2v[:1], {k: v[:1] for k, v in sc.items()})
    with pytest.raises(RecordsError, match=r"manifest\['num_vision'\] must be a positive int"):
        RecordStore.create_or_resume(tmp_path / "x", manifest(num_vision=0))


# -- a different number of vision tokens per sample (manifest num_vision null) --------------------------------------
def ragged_batch(start: int, counts: list[int], seed: int = 0) -> tuple[list[str], list[torch.Tensor], dict]:
    """Per-sample t2v [L, V_i] (the V_i in `counts`) and scalars, as a collector of images of different sizes gives."""
    g = torch.Generator().manual_seed(seed + start)
    ids = [f"s{i:04d}" for i in range(start, start + len(counts))]
    per_sample = [torch.rand(L, v, generator=g) for v in counts]
    n = len(counts)
    scalars = {"vision_share": torch.rand(n, L, generator=g), "prior_entropy": torch.rand(n, L, generator=g)}
    return ids, per_sample, scalars


def padded(per_sample: list[torch.Tensor], width: int | None = None, fill: float = 0.0) -> torch.Tensor:
    width = width or max(t.shape[1] for t in per_sample)
    out = torch.full((len(per_sample), L, width), fill)
    for i, t in enumerate(per_sample):
        out[i, :, : t.shape[1]] = t
    return out


def test_variable_vision_store_round_trip(tmp_path: Path) -> None:
    store = RecordStore.create_or_resume(tmp_path, manifest(num_vision=None))
    assert store.num_vision is None and store.variable_vision
    first = ragged_batch(0, [3, 7, 5])
    second = ragged_batch(3, [4, 2])
    # a collector batch is padded to its own widest sample, with anything after each V_i: the store keeps V_i only
    store.write_shard(first[0], padded(first[1], width=9, fill=0.5), first[2], vision_counts=[3, 7, 5])
    store.write_shard(second[0], padded(second[1]), second[2], vision_counts=torch.tensor([4, 2]))
    raw = torch.load(tmp_path / "shards" / "shard-00000.pt", weights_only=True)
    assert raw["t2v"].shape == (3, L, 7) and raw["vision_counts"].tolist() == [3, 7, 5]
    rec = RecordStore.open(tmp_path).load()
    assert rec.ragged and rec.max_vision == 7 and rec.counts().tolist() == [3, 7, 5, 4, 2]
    assert rec.vision_range() == "2..7" and rec.t2v.shape == (5, L, 7)
    for i, t in enumerate(first[1] + second[1]):
        assert torch.equal(rec.sample_t2v(i), t)
    assert torch.equal(rec.t2v[~rec.vision_mask()[:, None, :].expand(-1, L, -1)], torch.zeros(5 * L * 7 - L * 21))
    # the mean over samples of each token index counts only the samples that have it
    assert torch.allclose(rec.mean_t2v()[:, 6], first[1][1][:, 6])
    assert torch.allclose(rec.mean_t2v()[:, 0], torch.stack([t[:, 0] for t in first[1] + second[1]]).mean(0))
    with pytest.raises(RecordsError, match=r"different number of vision tokens per sample \(2\.\.7\)"):
        rec.num_vision
    sub = rec.subset([4, 1])
    assert sub.counts().tolist() == [2, 7] and torch.equal(sub.sample_t2v(0), second[1][1])
    parts = list(RecordStore.open(tmp_path).iter_shards())
    assert [p.counts().tolist() for p in parts] == [[3, 7, 5], [4, 2]]


def test_variable_vision_resume_equals_single_run(tmp_path: Path) -> None:
    counts = [5, 3, 8, 2, 6, 4]
    one = RecordStore.create_or_resume(tmp_path / "one", manifest(num_vision=None))
    ids, per_sample, sc = ragged_batch(0, counts)
    one.write_shard(ids, padded(per_sample), sc, vision_counts=counts)
    two = RecordStore.create_or_resume(tmp_path / "two", manifest(num_vision=None))
    two.write_shard(ids[:2], padded(per_sample[:2]), {k: v[:2] for k, v in sc.items()}, vision_counts=counts[:2])
    del two  # "interrupt"
    resumed = RecordStore.create_or_resume(tmp_path / "two", manifest(num_vision=None))
    assert resumed.done_ids() == set(ids[:2])
    resumed.write_shard(ids[2:], padded(per_sample[2:]), {k: v[2:] for k, v in sc.items()}, vision_counts=counts[2:])
    a, b = RecordStore.open(tmp_path / "one").load(), RecordStore.open(tmp_path / "two").load()
    assert a.ids == b.ids and torch.equal(a.t2v, b.t2v) and torch.equal(a.vision_counts, b.vision_counts)
    assert all(torch.equal(a.scalars[k], b.scalars[k]) for k in a.scalars)


def test_fixed_vision_shards_are_written_as_before(tmp_path: Path) -> None:
    """A fixed-V store's shard holds exactly ids, t2v, scalars (readable by earlier versions); counts equal to its V
    are accepted and not stored."""
    store = RecordStore.create_or_resume(tmp_path, manifest())
    ids, t2v, sc = batch(0, 2)
    store.write_shard(ids, t2v, sc, vision_counts=[V, V])
    raw = torch.load(tmp_path / "shards" / "shard-00000.pt", weights_only=True)
    assert set(raw) == {"ids", "t2v", "scalars"} and torch.equal(raw["t2v"], t2v)
    rec = store.load()
    assert not rec.ragged and rec.vision_counts is None and rec.num_vision == V and rec.counts().tolist() == [V, V]


def test_variable_vision_errors(tmp_path: Path) -> None:
    fixed = RecordStore.create_or_resume(tmp_path / "fixed", manifest())
    ids, t2v, sc = batch(0, 2)
    with pytest.raises(RecordsError, match=r"differ from this store's num_vision=9.*num_vision: null"):
        fixed.write_shard(ids, t2v, sc, vision_counts=[9, 4])
    store = RecordStore.create_or_resume(tmp_path / "var", manifest(num_vision=None))
    with pytest.raises(RecordsError, match="give write_shard vision_counts"):
        store.write_shard(ids, t2v, sc)
    with pytest.raises(RecordsError, match=r"W >= 12\] \(the largest of vision_counts\)"):
        store.write_shard(ids, t2v, sc, vision_counts=[12, 3])
    with pytest.raises(RecordsError, match="vision_counts must be 2 ints >= 1"):
        store.write_shard(ids, t2v, sc, vision_counts=[0, 3])
    assert not list((tmp_path / "var" / "shards").glob("shard-*.pt"))  # nothing written
    store.write_shard(ids, t2v, sc, vision_counts=[9, 3])
    path = tmp_path / "var" / "shards" / "shard-00000.pt"
    torch.save({"ids": ids, "t2v": t2v, "scalars": sc}, path)  # counts lost
    with pytest.raises(RecordsError, match=r"shard-00000\.pt is corrupt: it needs vision_counts"):
        RecordStore.open(tmp_path / "var").load()
    with pytest.raises(RecordsError, match="num_vision.*must be a positive int \\(or null"):
        RecordStore.create_or_resume(tmp_path / "x", manifest(num_vision="16"))
