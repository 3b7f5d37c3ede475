import io
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import tensorgrid as tg
from tensorgrid import transforms as T


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_resize_float_normalize_in_a_loader(tmp_path):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (6, 5, 3), dtype=np.uint8) for _ in range(20)]
    ds = tg.write(str(tmp_path / "i"), pd.DataFrame({"image": [_png(a) for a in imgs], "label": range(20)}))
    batch = next(iter(ds.to_torch(batch_size=8, transform=T.decode_image)))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (8, 3, 6, 5)
    assert torch.equal(batch["image"][1], torch.from_numpy(imgs[1]).permute(2, 0, 1))  # PNG is lossless
    hwc = T.decode_image({"image": [_png(imgs[0])]}, channels_first=False)["image"]
    assert hwc.shape == (1, 6, 5, 3)
    pipeline = T.compose(T.decode_image, T.resize(size=(4, 4)), T.to_float, T.normalize(mean=[0.5] * 3, std=[0.25] * 3))
    pickle.loads(pickle.dumps(pipeline))  # usable by spawned workers
    b = next(iter(ds.to_torch(batch_size=8, transform=pipeline, num_workers=1, multiprocessing_context="spawn")))
    x = b["image"]
    assert x.shape == (8, 3, 4, 4) and x.dtype == torch.float32
    ref = (torch.nn.functional.interpolate(torch.from_numpy(np.stack(imgs[:8])).permute(0, 3, 1, 2).float(),
                                           size=(4, 4), mode="bilinear", antialias=True).round() / 255 - 0.5) / 0.25
    assert torch.allclose(x, ref, atol=1e-5)


def test_decode_sizes_and_grayscale():
    a, b = np.zeros((4, 4, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="size="):
        T.decode_image({"image": [_png(a), _png(b)]})
    out = T.decode_image({"image": [_png(a), _png(b)]}, size=(4, 4))["image"]
    assert out.shape == (2, 3, 4, 4)
    gray = T.decode_image({"image": [_png(np.zeros((3, 3), np.uint8))]}, mode="L")["image"]
    assert gray.shape == (1, 1, 3, 3)


def test_to_float_scales_uint8_only():
    assert T.to_float({"image": torch.full((1, 2), 255, dtype=torch.uint8)})["image"].max() == 1.0
    assert T.to_float({"image": torch.full((1, 2), 3, dtype=torch.int32)})["image"].max() == 3.0


def test_decode_splits_a_batch_over_threads_with_the_same_result():
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 255, (7, 9, 3), dtype=np.uint8) for _ in range(70)]
    batch = {"image": [_png(a) for a in imgs]}
    one = T.decode_image(dict(batch), threads=1)["image"]
    four = T.decode_image(dict(batch), threads=4)["image"]
    assert torch.equal(one, four) and torch.equal(four, torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2))
    odd = batch["image"][:50] + [_png(np.zeros((3, 3, 3), np.uint8))] + batch["image"][50:]
    with pytest.raises(ValueError, match="different sizes"):  # raised in a decode thread, surfaces here
        T.decode_image({"image": odd}, threads=4)


def test_positional_options_are_refused_by_name():
    with pytest.raises(TypeError, match=r"resize\(\) takes a batch dict"):
        T.resize(8)
    assert T.resize(size=(2, 2))({"image": torch.zeros(1, 1, 4, 4)})["image"].shape == (1, 1, 2, 2)


def _images(n=40, h=9, w=12):
    """Images whose pixels say where they are: image i, channel c, row r, column k -> a distinct value."""
    i, c, r, k = np.meshgrid(np.arange(n), np.arange(3), np.arange(h), np.arange(w), indexing="ij")
    return (i * 1000 + c * 100 + r * 10 + k).astype(np.int32)


def test_center_crop_resize_keeping_aspect_and_flip_do_what_they_say():
    x = torch.from_numpy(_images(2))
    crop = T.center_crop({"image": x.clone()}, size=(5, 6))["image"]
    assert torch.equal(crop, x[..., 2:7, 3:9])
    assert T.center_crop({"image": x.clone()}, size=9)["image"].shape == (2, 3, 9, 9)
    with pytest.raises(ValueError, match="cannot cut 10x10 out of 9x12"):
        T.center_crop({"image": x}, size=10)
    with pytest.raises(ValueError, match="decode the images first"):
        T.center_crop({"image": [b"png bytes"]}, size=2)
    assert T.resize({"image": torch.zeros(1, 3, 100, 50, dtype=torch.uint8)}, size=20)["image"].shape == (1, 3, 40, 20)
    assert T.resize({"image": torch.zeros(1, 3, 30, 90)}, size=10)["image"].shape == (1, 3, 10, 30)
    assert torch.equal(T.horizontal_flip({"image": x.clone()}, p=1.0)["image"], x.flip(-1))
    assert torch.equal(T.horizontal_flip({"image": x.clone()}, p=0.0)["image"], x)


def test_random_crops_are_windows_of_their_own_image():
    x = torch.from_numpy(_images(30))
    out = T.random_crop({"image": x.clone()}, size=(4, 5))["image"]
    assert out.shape == (30, 3, 4, 5)
    tops, lefts = set(), set()
    for i in range(30):
        t, left = (int(out[i, 0, 0, 0]) % 100) // 10, int(out[i, 0, 0, 0]) % 10
        assert int(out[i, 0, 0, 0]) // 1000 == i
        assert torch.equal(out[i], x[i, :, t:t + 4, left:left + 5])
        tops.add(t), lefts.add(left)
    assert len(tops) > 1 and len(lefts) > 1  # places differ per image


@pytest.mark.parametrize("workers", [0, 2])
def test_random_transforms_depend_on_the_seed_and_batch_only(tmp_path, workers):
    """The same seed gives the same crops and flips in process and in (spawned) workers, epoch after epoch
    and after a resume; another epoch draws others."""
    x = _images(64)
    ds = tg.write(str(tmp_path / "i"), pd.DataFrame({"id": np.arange(64)}).assign(
        image=list(x)), shard_rows=16)
    tf = T.compose(T.random_crop(size=(4, 4)), T.horizontal_flip(p=0.5))
    kw = dict(batch_size=8, shuffle=True, seed=11, transform=tf)

    def run(loader, epoch):
        loader.set_epoch(epoch)
        return [(b["id"].tolist(), b["image"].clone()) for b in loader]

    ref = run(ds.to_torch(**kw), 0)
    other = run(ds.to_torch(**kw, num_workers=workers, multiprocessing_context="spawn" if workers else None), 0)
    assert [i for i, _ in ref] == [i for i, _ in other]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(ref, other))
    def by_row(batches):
        return {r: img[j] for ids, img in batches for j, r in enumerate(ids)}

    first, later = by_row(ref), by_row(run(ds.to_torch(**kw), 1))
    changed = sum(not torch.equal(first[r], later[r]) for r in range(64))
    assert changed > 32  # another epoch, other crops (a crop repeats by chance 1 time in 36 here)
    resumed = ds.to_torch(**kw)
    it = iter(resumed)
    next(it), next(it), next(it)
    state = resumed.state_dict()
    fresh = ds.to_torch(**kw)
    fresh.load_state_dict(state)
    rest = [(b["id"].tolist(), b["image"].clone()) for b in fresh]
    assert [i for i, _ in rest] == [i for i, _ in ref[3:]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(rest, ref[3:]))
