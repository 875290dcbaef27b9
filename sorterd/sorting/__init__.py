"""The sorting stages, in the order a stone meets them.

  trigger_queue  edges waiting for a capture (bounded; edges a capture covered are dropped)
  capture        one §2.2 frame pair: both strobes scheduled ahead, frames exposed, lighting audited
  segment        background-referenced masks, objects paired across the two frames, size/speed,
                 clusters; crops for the model
  track          a stone in view for several captures is decided once
  (inference)    the model is a part: `sorterd.parts.inference`
  decide         §5.2 confidence gate and §8.2 bin
  eject          when the stone passes its bin's nozzle, and the pulse for it
  neighbours     no jet may catch a second stone (cancel, or flag a co-deflection risk)
  record         one SQLite writer thread, one image thread, the stone row
  ledger         every trigger edge is a stone: decided, or counted as passed unseen
  stats          one place that counts: the run's figures and the Prometheus series together
  pipeline       only the wiring: tasks and queues between the stages above
  summary        the run summary from what the daemon itself knows

Everything here is real-machine code: it imports neither the simulator nor the
composition root (`tests/test_layout.py`).
"""
