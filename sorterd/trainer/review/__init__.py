"""The review page (§3.1): flagged stones from the trainer's inbox labelled in a browser.

`app.make_app(root)` is the aiohttp application (served by `sorterd review --data DIR` or by
`sorterd trainer --review-port N`); `static/` the one page (HTML/JS/CSS, nothing fetched from the
network); labels go through `sorterd.trainer.labels.LabelStore`.  Needs the `trainer` extra.
"""
