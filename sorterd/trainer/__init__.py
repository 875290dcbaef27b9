"""The trainer's side of the link (DESIGN §4a, §5): what arrives from the sorters, kept as a §7.1 dataset.

* `inbox`   -- `open_inbox(root)`: the link server's `InboxSink`; writes every stone and session
  record into DIR (§7.1 layout) and the unlabelled review queue, durably and idempotently;
* `metrics` -- the trainer's Prometheus metrics (a registry of its own);
* `status`  -- the per-sorter table `sorterd trainer status --data DIR` prints.

Nothing here imports the simulator, the pipeline or the transport.
"""
