"""What more data buys, checked on real data offline (scikit-learn's digits): a learning curve fitted on
training sets up to 40% of the rows predicts the validation error at 100%, which is then measured.

Run: python examples/learning_curve.py (a flat script, ~30 s on 2 cores); writes learning_curve.png.
"""

import os
import tempfile

import torch

import tensorgrid as tg
from tensorgrid.quickstart import digits_frame

frame = digits_frame().sample(frac=1.0, random_state=0).reset_index(drop=True)
root = tempfile.mkdtemp(prefix="tg-curve-")
train = tg.write(f"{root}/train", frame.iloc[:1200])
val = tg.write(f"{root}/val", frame.iloc[1200:])  # 597 rows the runs never train on


def scaled(batch):  # 8x8 images, 0..16 -> 64 floats in [0, 1]
    batch["image"] = batch["image"].float().div_(16).flatten(1)
    return batch


def make_trainer():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    return tg.Trainer(net, loss=torch.nn.CrossEntropyLoss(), features="image", label="label", transform=scaled,
                      optimizer=lambda p: torch.optim.Adam(p, lr=1e-2), batch_size=32, epochs=6, quiet=True)


REPEATS = int(os.environ.get("REPEATS", "5"))
curve = tg.learning_curve(make_trainer(), train, val, sizes=[60, 90, 135, 200, 300, 480], repeats=REPEATS,
                          work_dir=f"{root}/runs")
print(curve.table.to_string(index=False))
print(curve)
value, low, high = curve.predict(1200)
# measured at 100%: the same runs (nested subsets, same seeds) at all 1,200 rows
full = tg.learning_curve(make_trainer(), train, val, sizes=[480, 720, 960, 1200], repeats=REPEATS,
                         work_dir=f"{root}/runs")
measured = float(full.table.set_index("size").loc[1200, "error_mean"])
print(f"fitted on <= 480 rows (40%): predicted error at 1,200 rows {value:.4f} (95%: {low:.4f}..{high:.4f})")
print(f"measured at 1,200 rows: {measured:.4f} ({REPEATS} runs)")
print(curve.roi(cost_per_row=0.05, value_per_point=20.0)["summary"])
print("plot:", curve.plot("learning_curve.png", target_error=0.02))
assert low <= measured <= high, (low, measured, high)
assert high - value <= 0.03 and value - low <= 0.03, (low, value, high)  # no wider than +-3 points
