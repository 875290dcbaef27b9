"""The contracts between the sorter, the trainer and other tools (files on disk).

  session  a §7.1 recorded capture session: raw frame pairs, references, session_meta.json
  dataset  a §7.1 labelled dataset: labels.jsonl, crops, sessions, splits (read and checked)
  bundle   the model bundle: model.onnx + manifest.json, read and written (torch-free)
  files    atomic file writers (temp file, fsync, rename): JSON state and PNG images
"""
