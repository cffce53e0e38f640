"""Test-session settings: one torch thread (CI machines have 2 cores and the suite also starts Flower/Ray
processes; two intra-op threads per process oversubscribe them and make timings erratic)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)
