"""The link: flagged stones from the sorter to the trainer (§5.1), over CurveZMQ.

    sorter:  pipeline → outbox (disk first: SQLite WAL, fsync) → client (DEALER)
                                    ──CurveZMQ──▶  trainer: server (ROUTER + ZAP) → inbox (§7.1 dataset)

Modules (the wire protocol is written down in `PROTOCOL.md` beside this file):

* `records`  -- what travels: `StoneRecord`, `SessionRecord`, their key, and the
  Protocols the transport uses on each side (`OutboxSource`, `InboxSink`);
* `outbox`   -- the sorter's durable queue (one writer thread, disk quota, drops by priority);
* `wire`     -- frames <-> records, parsed strictly (size limits, types, schema version);
* `keys`     -- CurveZMQ key pairs on disk (secret files 0600, refused when readable by others);
* `client`   -- the sorter's side of the link (DEALER, acks, resends, heartbeats, backoff);
* `server`   -- the trainer's side (ROUTER, ZAP allow-list on the same context, fail closed).

The trainer's inbox (writing what arrives into a §7.1 dataset) is `sorterd.trainer.inbox`.
Nothing here imports the simulator or the pipeline.
"""
