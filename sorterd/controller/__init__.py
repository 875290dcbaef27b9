"""The output controllers that time valve and strobe edges outside asyncio.

  outputs    the output command (`Pulse`), its reported outcome, timing statistics,
             and the registry that turns every open output off at interpreter exit
  proto      the valve-controller serial protocol (framing, CRC, commands; `hw/PROTOCOL.md`)
  clocksync  the fitted host <-> controller clock relation (Klipper-style)
  mcu        the controller link: pulses sent ahead in the controller's clock, fired by its timer
  gpio       one real-time host thread driving GPIO lines (libgpiod or Jetson.GPIO)

Valves and strobe lights are both outputs of these (one controller serves every pin);
the part backends in `sorterd/parts/valves/` and `sorterd/parts/lights/` open them.
"""
