"""Train the ``vit-digits`` zoo model and write its weights: ``python -m onnxsmith.models.train_vit_digits``.

Training is deterministic (fixed seed, deterministic torch algorithms, one CPU thread) and uses only the train
split; the test split is touched once, at the end, to print the accuracy. It takes about a minute on one
CPU core. The weights land in :data:`onnxsmith.models.vit_digits.WEIGHTS_PATH` as float32 arrays keyed by
``state_dict`` names.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from onnxsmith.models.vit_digits import WEIGHTS_PATH, TinyViT, digits_split

SEED = 0
EPOCHS = 120
BATCH = 64
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 0.05


def train() -> tuple[TinyViT, float]:
    """Train a fresh ``TinyViT`` on the train split; return it (in eval mode) and its test accuracy."""
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(SEED)
    split = digits_split()
    images = torch.from_numpy(split.train_images.copy())
    labels = torch.from_numpy(split.train_labels.copy())

    model = TinyViT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = -(-len(images) // BATCH)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=LEARNING_RATE, total_steps=EPOCHS * steps_per_epoch, pct_start=0.1
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), BATCH):
            batch = order[start : start + BATCH]
            loss = loss_fn(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()

    model.eval()
    with torch.no_grad():
        predictions = model(torch.from_numpy(split.test_images.copy())).argmax(dim=-1).numpy()
    return model, float(np.mean(predictions == split.test_labels))


def main() -> None:
    """Train, print the test accuracy and wall time, and save the weights."""
    started = time.perf_counter()
    model, accuracy = train()
    elapsed = time.perf_counter() - started
    WEIGHTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    arrays = {key: value.detach().numpy().astype(np.float32) for key, value in model.state_dict().items()}
    np.savez(WEIGHTS_PATH, **arrays)
    print(f"test accuracy {accuracy:.4f} ({len(digits_split().test_labels)} images), trained in {elapsed:.1f} s")
    print(f"wrote {WEIGHTS_PATH} ({WEIGHTS_PATH.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
