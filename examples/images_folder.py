"""An image folder end to end: scikit-learn's digits written as PNG files into one folder per class,
read with read_images (labels from the folders), a classifier trained on decoded images, evaluated, and a
confusion matrix drawn to a PNG. Run: python examples/images_folder.py (a flat script, ~15 s on 2 cores)."""

import os
import tempfile

import torch
from PIL import Image

import tensorgrid.transforms as T
from tensorgrid.ml import NNClassifier, evaluate, read_images
from tensorgrid.quickstart import digits_cnn, digits_frame

root = tempfile.mkdtemp(prefix="tg-images-")
for i, (image, label) in enumerate(zip(*digits_frame()[["image", "label"]].T.values)):
    os.makedirs(f"{root}/photos/digit_{label}", exist_ok=True)
    Image.fromarray(image).save(f"{root}/photos/digit_{label}/{i:04d}.png")

images = read_images(f"{root}/photos", url=f"{root}/digits")  # image bytes, path, label, label_index
print(f"{images.num_rows} images in {len(images.label_names)} classes: {images.label_names}")
train, val = images.split([0.8, 0.2], seed=0, stratify="label_index")

prep = T.compose(T.decode_image(mode="L"), T.to_float())  # PNG bytes -> (N, 1, 8, 8) floats in [0, 1]


def gray(batch):  # quickstart's CNN takes (N, 8, 8) images
    batch["image"] = prep(batch)["image"][:, 0]
    return batch


model = NNClassifier(digits_cnn(), torch.nn.CrossEntropyLoss(), optimizer=lambda p: torch.optim.Adam(p, lr=3e-3),
                     batch_size=64, max_epoch=10, features_col="image", label_col="label_index",
                     transform=gray).fit(train)
pred = model.transform(val)
report = evaluate.precision_recall_f1(pred, label_col="label_index")
print(f"validation accuracy {evaluate.accuracy(pred, label_col='label_index'):.3f}, "
      f"macro F1 {report.macro['f1']:.3f}")
png = evaluate.confusion_matrix(pred, label_col="label_index").plot(f"{root}/confusion.png")
print(f"confusion matrix: {png}")
assert evaluate.accuracy(pred, label_col="label_index") > 0.9
