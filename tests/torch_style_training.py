"""A training script written for torch.utils.data.DataLoader; only the import line differs.

tests/test_compat.py runs ``main()`` and checks the loss is finite and falls.  Run it directly
with ``python3 tests/torch_style_training.py`` to see the losses.
"""
import torch
from torch import nn
from torch.utils.data import TensorDataset

from gpuloader import DataLoader  # was: from torch.utils.data import DataLoader


def main(epochs: int = 4) -> list:
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    true_w = torch.randn(8, 1)
    y = x @ true_w + 0.01 * torch.randn(512, 1)
    dataset = TensorDataset(x, y)
    loader = DataLoader(dataset, batch_size=32, shuffle=True, drop_last=True, num_workers=0)

    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_fn = nn.MSELoss()

    losses = []
    for epoch in range(epochs):
        total, batches = 0.0, 0
        for inputs, targets in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            optimizer.step()
            total += loss.item()
            batches += 1
        assert batches == len(loader)
        losses.append(total / batches)
    return losses


if __name__ == "__main__":
    for epoch, loss in enumerate(main()):
        print(f"epoch {epoch}: loss {loss:.4f}")
