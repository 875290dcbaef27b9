"""The §2.4 calibration checklist, run before every sorting session.

  checklist  the steps and their measurements (warm-up, references, backlight drift, white
             balance, scale, reference stones, valve timing), profiles and the baseline,
             and what `sorterd run` needs of today's profile
  rig        `MachineRig`: the checklist's `Rig` over a real machine's parts, with an operator

The simulated machine's rig is `sorterd/sim/rig.py`; the composition root picks one.
"""
