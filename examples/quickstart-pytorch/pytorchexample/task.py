"""pytorchexample: A Flower / PyTorch app.

Flower's quickstart-pytorch ``task.py`` with one change of data: Fashion-MNIST (1x28x28 images) from fedbayes'
local data cache (``fedbayes.data.load_dataset("fmnist")``, fetched once with ``fedbayes data fetch fmnist``)
split IID across the partitions, instead of CIFAR-10 downloaded through flwr-datasets.  ``Net`` takes 1 input
channel (28x28 images) instead of 3 (32x32); the ``train`` and ``test`` loops are Flower's, unchanged.
"""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from fedbayes.data import load_dataset, partition
from torch.utils.data import DataLoader, Dataset


class Net(nn.Module):
    """Model (simple CNN adapted from 'PyTorch: A 60 Minute Blitz')"""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 4 * 4)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class ImageDataset(Dataset):
    """Images and labels as Flower's datasets give them: {"img": tensor, "label": int}."""

    def __init__(self, x, y):
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y).long()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"img": self.x[i], "label": self.y[i]}


fds = None  # Cache the dataset


def load_data(partition_id: int, num_partitions: int, batch_size: int, examples_per_client: int = 0):
    """Load partition Fashion-MNIST data (IID split, seeded)."""
    global fds
    if fds is None:
        fds = load_dataset("fmnist")
    idx = partition(fds.y_train, num_partitions, "iid", seed=42)[partition_id]
    if examples_per_client > 0:
        idx = idx[:examples_per_client]
    # Divide data on each node: 80% train, 20% test
    rng = np.random.default_rng(42)
    idx = rng.permutation(idx)
    cut = int(0.8 * len(idx))
    train_ds = ImageDataset(fds.x_train[idx[:cut]], fds.y_train[idx[:cut]])
    test_ds = ImageDataset(fds.x_train[idx[cut:]], fds.y_train[idx[cut:]])
    trainloader = DataLoader(train_ds, batch_size=batch_size, shuffle=True)
    testloader = DataLoader(test_ds, batch_size=batch_size)
    return trainloader, testloader


def load_centralized_dataset():
    """Load test set and return dataloader."""
    global fds
    if fds is None:
        fds = load_dataset("fmnist")
    return DataLoader(ImageDataset(fds.x_test, fds.y_test), batch_size=128)


def train(net, trainloader, epochs, lr, device):
    """Train the model on the training set."""
    net.to(device)  # move model to GPU if available
    criterion = torch.nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for batch in trainloader:
            images = batch["img"].to(device)
            labels = batch["label"].to(device)
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    avg_trainloss = running_loss / (epochs * len(trainloader))
    return avg_trainloss


def test(net, testloader, device):
    """Validate the model on the test set."""
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for batch in testloader:
            images = batch["img"].to(device)
            labels = batch["label"].to(device)
            outputs = net(images)
            loss += criterion(outputs, labels).item()
            correct += (torch.max(outputs.data, 1)[1] == labels).sum().item()
    accuracy = correct / len(testloader.dataset)
    loss = loss / len(testloader)
    return loss, accuracy
