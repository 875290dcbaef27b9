"""`sorterd train`: the --out folder, the version and the model log agree, and README's example dirties no clone."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from sorterd.cli import build_parser, main

pytest.importorskip("torch", reason="the trainer needs the train extra (torch)")

from sorterd.data.dataset import Dataset  # noqa: E402
from sorterd.train.job import FitOptions, asked_version, next_version  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHIPPED_LOG = REPO / "models" / "model_log.jsonl"


def opts(out: Path, **kw: object) -> FitOptions:
    return FitOptions(data=Path("unused"), out=out, **kw)  # type: ignore[arg-type]


def write_log(path: Path, *entries: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))


def test_a_folder_named_like_a_version_is_the_version(tmp_path: Path) -> None:
    assert asked_version(opts(tmp_path / "models" / "v007")) == "v007"
    assert asked_version(opts(tmp_path / "models" / "v2")) == "v002"
    assert asked_version(opts(tmp_path / "models" / "mine")) is None
    assert asked_version(opts(tmp_path / "models" / "mine", version="v010")) == "v010"
    assert asked_version(opts(tmp_path / "models" / "v010", version="v10")) == "v10"


def test_a_folder_with_another_name_gets_the_next_version_after_the_log(tmp_path: Path) -> None:
    write_log(tmp_path / "models" / "model_log.jsonl", {"version": "v001"}, {"version": "v002"})
    o = opts(tmp_path / "models" / "mine")
    assert asked_version(o) is None
    assert next_version(o, Dataset(tmp_path / "ds", [], {}), None) == "v003"


def test_a_version_that_contradicts_the_folder_is_refused(tmp_path: Path) -> None:
    from sorterd.data.dataset import DatasetError

    with pytest.raises(DatasetError, match=r"--out .*v002 names version v002 but --version is v003: the bundle's "
                                           r"folder and its version must agree"):
        asked_version(opts(tmp_path / "v002", version="v003"))


def test_a_version_the_log_gives_another_bundle_is_refused(tmp_path: Path) -> None:
    from sorterd.data.dataset import DatasetError

    log = tmp_path / "models" / "model_log.jsonl"
    write_log(log, {"version": "v001", "bundle": "old/v001"}, {"version": "v002", "bundle": "models/default"})
    with pytest.raises(DatasetError, match=r"already records v002 \(bundle models/default\): a version names one "
                                           r"model; write to .*v003 \(the next free version\)"):
        asked_version(opts(tmp_path / "models" / "v002"))
    # The same bundle made again (--force) keeps its version; without a log there is nothing to clash with.
    write_log(log, {"version": "v002", "bundle": str(tmp_path / "models" / "v002")})
    assert asked_version(opts(tmp_path / "models" / "v002")) == "v002"
    write_log(log, {"version": "v002", "bundle": "models/default"})
    assert asked_version(opts(tmp_path / "models" / "v002", write_log=False)) == "v002"


def test_the_old_readme_example_is_refused_before_any_training(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`--out models/v002` beside the shipped log (which has v002 and v005: models/default, and v003:
    models/v003) made a new version there; it is refused, naming the next free one."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(SHIPPED_LOG, models / "model_log.jsonl")
    before = (models / "model_log.jsonl").read_text()
    code = main(["train", "--data", str(tmp_path / "no-data"), "--out", str(models / "v002"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "already records v002 (bundle models/default)" in err and "models/v006" in err, err
    assert (models / "model_log.jsonl").read_text() == before and not (models / "v002").exists()
    code = main(["train", "--data", str(tmp_path / "no-data"), "--out", str(models / "v007"), "--version", "v008"])
    assert code == 2 and "names version v007 but --version is v008" in capsys.readouterr().err


def test_train_help_says_how_folder_version_and_log_agree() -> None:
    sub = build_parser()._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    text = " ".join(sub.format_help().split())
    assert "name the --out folder after the version (models/v003 makes v003" in text
    assert "model_log.jsonl beside the bundle" in text


def _training_example() -> list[list[str]]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Training a model", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line.split("#", 1)[0]) for line in block.splitlines() if line.startswith("sorterd ")]


def _flag(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_the_readme_training_example_writes_only_where_git_ignores(tmp_path: Path) -> None:
    """Every file the example writes (datasets, bundles, the model log, metrics, the report) is git-ignored,
    and each bundle's folder names its version, in order."""
    if shutil.which("git") is None or subprocess.run(["git", "-C", str(REPO), "rev-parse"],
                                                     capture_output=True).returncode != 0:
        pytest.skip("needs git and a clone")
    written: list[str] = []
    versions = []
    for cmd in _training_example():
        out = _flag(cmd, "--out")
        if cmd[1:3] == ["sim", "generate"] and out:
            written.append(f"{out}/labels.jsonl")
        if cmd[1] == "train" and out:
            assert "--log" not in cmd and "--version" not in cmd
            written += [f"{out}/manifest.json", str(Path(out).parent / "model_log.jsonl")]
            versions.append(Path(out).name)
        for flag, inside in (("--json", ""), ("--report", "/report.html")):
            if _flag(cmd, flag):
                written.append(f"{_flag(cmd, flag)}{inside}")
    assert versions and all(re.fullmatch(r"v\d{3}", v) for v in versions)
    assert versions == [f"v{i:03d}" for i in range(1, len(versions) + 1)]  # a fresh log: v001, v002, ...
    res = subprocess.run(["git", "-C", str(REPO), "check-ignore", "--no-index", "--verbose", "--non-matching",
                          *written], capture_output=True, text=True)
    not_ignored = [line.split("\t")[1] for line in res.stdout.splitlines() if line.startswith("::")]
    assert not_ignored == [], f"README's training example writes into the clone: {not_ignored}"
