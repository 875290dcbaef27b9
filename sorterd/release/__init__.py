"""Signed model releases (DESIGN §4, §4a; protocol §8.4 item 6): what the trainer signs and the
sorter accepts, stages, checks and swaps in.

* `keys`    -- Ed25519 release-signing key pairs (a release key is not a link key);
* `sign`    -- the trainer side: a bundle becomes release N (manifest lists every file, signed);
* `verify`  -- the ONE verification the sorter and `sorterd models verify` run, check by check;
* `store`   -- the sorter's `<models.dir>`: staging, releases/<N>, state.json (active, previous,
               the highest release ever accepted), every transition one atomic rename;
* `qa`      -- the QA gate: golden-input parity and the reference kit (>= 90 % agreement).

The sorter never unpickles anything on this path: `weights.pt` is not part of a release.
"""
