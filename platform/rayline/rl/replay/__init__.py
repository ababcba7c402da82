"""Experience replay: preallocated numpy storage composed with a uniform or prioritised
sampler, plus the thin Ray actor that shares one buffer (one shard) between collectors
and learner.

Prioritised replay follows Schaul et al. 2016 (https://arxiv.org/abs/1511.05952):
P(i) = p_i^alpha / sum_k p_k^alpha, importance weights (N * P(i))^-beta normalised by
the batch maximum, new transitions at the highest priority seen so far.

Sharding (Horgan et al. 2018's Ape-X at scale): the learner sees several buffers as one.
It knows each shard's probability mass (its sum of p^alpha, or its size when uniform),
draws stratified points over the concatenated masses, and sends each shard the points
that fall in it; the shard answers with the slots its sum tree finds. A batch drawn so
is distributed exactly as one drawn from a single buffer holding every shard's contents,
and so are its importance weights, which the learner computes from the global mass.

Pixels (`FrameStorage`): a stack of 4 frames is 4 indices into a store of single uint8
frames, and next_obs shares the frames of obs, so a transition costs about one frame.

Modules: batches (what moves between roles), sum_tree, storage (ring and frame storage,
the `Storage` protocol), samplers (uniform and prioritised, the `Sampler` protocol),
buffer (`ReplayBuffer`), parquet (its files), actor (`ReplayActor`, one shard) and
sharded (`ShardedReplay`, the learner's view of the shards).
"""

from rayline.rl.replay.actor import ReplayActor, Restored, Snapshot
from rayline.rl.replay.batches import FrameTransitions, SampledBatch, ShardSample, Transitions
from rayline.rl.replay.buffer import ReplayBuffer
from rayline.rl.replay.sharded import PendingSample, ShardedReplay

__all__ = [
    "FrameTransitions",
    "PendingSample",
    "ReplayActor",
    "ReplayBuffer",
    "Restored",
    "SampledBatch",
    "ShardSample",
    "ShardedReplay",
    "Snapshot",
    "Transitions",
]
