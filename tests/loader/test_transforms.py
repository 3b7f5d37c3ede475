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
