"""The layout comparison: the same global batch, image size and cores for every layout, on 1, 2,
4 or more ranks.

Layouts (README, "Growing"), each placed on the training path's own (replica x column) mesh
(``alexnet_mp.parallel.layout``) for the world size the bench runs on:

- ``d2l``, ``grouped``: one device (rank 0, with the cores of every rank on its node, while the
  other ranks wait);
- ``split``: the paper's two columns per replica, W/2 replicas (one rank: not available; two:
  the column split; four: 2 columns x 2 replicas); ``split_overlap`` the same with the
  exchanges overlapped with the column's own half of each layer;
- ``ddp``: the grouped model whole on every rank, W replicas;
- ``hybrid``: the convolution trunk data-parallel over all W ranks, the FC layers split over them.

Every rank runs this in lockstep; rank 0 reports. Traffic is reported per rank and per step in two
kinds, each counted on the built model (the tensors its exchanges moved; the gradients it
syncs) and computed from the architecture (:func:`~alexnet_mp.bench.counts.analytic_traffic`):
*exchange* (activations between the columns, or the hybrid layout's trunk features) and
*all-reduce* (gradients averaged or summed between replicas).

A timed step is what the training loop does: forward, backward, the cross-rank guard, the
optimizer. Each layout runs as one or more *variants* (:class:`~alexnet_mp.bench.work.Variant`:
torch's LRN instead of the fused one, the C library's default heap, channels_last,
torch.compile, ranks pinned to their cores), and every (layout, variant, data) *arm* runs once
per round, the rounds interleaved, so that the machine's drift hits every arm alike;
:mod:`alexnet_mp.bench.stats` turns the rounds into intervals and verdicts, and
:mod:`alexnet_mp.bench.attribution` the profiled steps into a per-layer table.
:mod:`alexnet_mp.bench.micro` holds the two measurements beside it (start-up, the LRN alone).

The modules, one job each (the package itself imports none of them):

- ``run``: every arm on every rank in interleaved rounds, what a rank measures in one, and
  rank 0's bench.json, bench.md and bench.png (:func:`~alexnet_mp.bench.run.run_bench`);
- ``layouts``: the layouts, which of them a world size can run, and each one's mesh;
- ``work``: one layout's model, step, variant, traffic meter and batches on one rank;
- ``traffic``: the exchanges timed and counted from outside the model, the all-reduce's bytes;
- ``lrn``: the LRN the fused one replaced, for the ``lrn_ref`` variant and the LRN alone;
- ``heap``: the C library's default heap, for the ``malloc_default`` variant;
- ``placement``: a rank's threads on its own share of the node's cores;
- ``memory``: a step's tensor memory by kind (torch's MemTracker), the process's resident peak;
- ``floor``: a step's exchanges replayed alone, the floor under the exchange share;
- ``counts``: traffic and FLOPs from the architecture and the shapes, and the matmul probe;
- ``merge``: every rank's record of a round into one, an arm's rounds into its result, and a
  rank's waiting for its peer told from the exchanges' own cost;
- ``stats``: bootstrap intervals, the targets and their verdicts;
- ``attribution``: the profiled steps' time per layer, exchange and phase;
- ``report``: bench.md's tables, the scaling table over several runs, bench.png;
- ``micro``: the main job's start-up and the LRN alone.
- ``saves``: how long a checkpoint save blocks the loop, synchronous and in the background.
"""
