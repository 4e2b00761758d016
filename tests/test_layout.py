"""The training layout (which indices each replica loads, with which count and loss weight) against a
reference written from the definition in syncstep/data.py's docstring, for any size, world, accumulation,
drop_last and resume offset."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from common import shuffled_order
from syncstep.data import TrainData
from syncstep.plan import plan_batch


def reference(order, b, world, accumulation, drop_last, start, replicas, averaging):
    """Per step: (samples in it, micro-batches), a micro-batch a list over ``replicas`` of (count, weight, indices)."""
    n, chunk = len(order), b * world
    g = chunk * accumulation
    steps = []
    begin = start
    while begin < n and not (drop_last and begin + g > n):
        samples = order[begin : min(begin + g, n)]
        micro = []
        for a in range(0, len(samples), chunk):
            mb = samples[a : a + chunk]
            shards = [mb[r::world] for r in range(world)]
            micro.append([(len(shards[r]), len(shards[r]) * averaging / len(samples), shards[r] or mb)
                          for r in replicas])
        steps.append((len(samples), micro))
        begin += g
    return steps


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 60), b=st.integers(1, 5), world=st.integers(1, 4), accumulation=st.integers(1, 3),
       drop_last=st.booleans(), start_fraction=st.floats(0, 1), dp=st.booleans(), shuffle=st.booleans())
def test_layout_matches_the_definition(n, b, world, accumulation, drop_last, start_fraction, dp, shuffle):
    ds = TensorDataset(torch.arange(n))
    g = b * world * accumulation
    start = int(start_fraction * (n // g)) * g  # resumes happen at step boundaries
    process_replicas = [list(range(world))] if dp else [[r] for r in range(world)]
    averaging = 1 if dp else world
    for replicas in process_replicas:
        data = TrainData(DataLoader(ds, batch_size=b, shuffle=shuffle, drop_last=drop_last), 7, len(replicas), True,
                         lambda make: make())
        data.set_layout(plan_batch(b, world, accumulation, None, None))
        data.set_replicas(replicas, averaging)
        plan, batches = data.start_epoch(3, start)
        # The documented epoch order (data.py, docs/strategies.md): seed 7 + epoch 3, or 0..n-1 unshuffled.
        order = shuffled_order(n, 7)(3) if shuffle else list(range(n))
        expected = reference(order, b, world, accumulation, drop_last, start, replicas, averaging)
        assert len(plan) == len(expected) == data.steps_per_epoch(start)
        loaded = [batch[0].tolist() for batch in batches]
        flat = [indices for _, micro in expected for replica_batches in micro for _, _, indices in replica_batches]
        assert loaded == flat
        for (step_samples, micro_batches), (want_samples, want) in zip(plan, expected):
            assert step_samples == want_samples
            assert len(micro_batches) == len(want)
            for a, ((counts, weights, is_last), m) in enumerate(zip(micro_batches, want)):
                assert list(counts) == [count for count, _, _ in m]
                assert list(weights) == [w for _, w, _ in m]
                assert is_last == (a == len(want) - 1)
