"""fastdpl linear-probe: CoOp's lpclip baseline. The choice of C against a literal transcription of
lpclip's search; the test accuracy against scikit-learn on image features computed here with
open_clip's own encode_image; the feature cache; results that `fastdpl report` reads."""
import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
from sklearn.linear_model import LogisticRegression  # noqa: E402

from fastdpl.cli import main  # noqa: E402
from fastdpl.pipeline import linear_probe  # noqa: E402
from fastdpl.pipeline.demo import demo_config  # noqa: E402


def _lpclip(train, val, steps):
    """lpclip/linear_probe.py's C search, transcribed: the sweep, then the log-space rounds."""
    def fit(c):
        # lpclip also passes penalty="l2", scikit-learn's default (a keyword 1.8 deprecates)
        return LogisticRegression(solver="lbfgs", max_iter=1000, C=c).fit(*train)

    def acc(clf):
        return sum(clf.predict(val[0]) == val[1]) / len(val[1])

    search = [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6]
    peak = search[int(np.argmax([acc(fit(c)) for c in search]))]
    c_left, c_right = 1e-1 * peak, 1e1 * peak
    for _ in range(steps):
        clf_left, clf_right = fit(c_left), fit(c_right)
        if acc(clf_left) < acc(clf_right):
            c_final, clf_final = c_right, clf_right
            c_left, c_right = 0.5 * (np.log10(c_right) + np.log10(c_left)), np.log10(c_right)
        else:
            c_final, clf_final = c_left, clf_left
            c_right, c_left = 0.5 * (np.log10(c_right) + np.log10(c_left)), np.log10(c_left)
        c_left, c_right = np.power(10, c_left), np.power(10, c_right)
    return c_final, clf_final


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_c_is_chosen_as_lpclip_chooses_it(seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, 8))
    def draw(n):
        labels = np.repeat(np.arange(4), n)
        return centres[labels] + rng.normal(scale=1.5, size=(len(labels), 8)), labels
    train, val, test = draw(6), draw(4), draw(20)
    c, classifier, record = linear_probe.choose_c(train, val, steps=5)
    theirs_c, theirs = _lpclip(train, val, steps=5)
    assert c == pytest.approx(theirs_c, rel=1e-12) and len(record["steps"]) == 5
    assert (classifier.predict(test[0]) == theirs.predict(test[0])).all()


def _cfg(tmp_path, **overrides):
    return demo_config(**{"output": str(tmp_path / "run"), "shots": 4, "progress": False, "eval_batch_size": 256,
                          "probe_steps": 3, **overrides})


def test_the_probe_end_to_end_against_sklearn_on_open_clips_features(tmp_path):
    from fastdpl.data import clip_transform, fewshot_splits, load_dataset, open_image
    from fastdpl.models import load_clip

    result = linear_probe.run_linear_probe(_cfg(tmp_path))
    saved = json.loads((tmp_path / "run" / "linear_probe" / "results.json").read_text())
    assert saved["stage"] == saved["method"] == "linear_probe" and saved["top1"] == result["top1"]
    # independently: open_clip's encode_image on the test preprocessing, sklearn at the chosen C
    model = load_clip("tiny")
    splits = fewshot_splits(load_dataset("builtin:digits"), 4, 1)
    transform = clip_transform(32, train=False)

    def features(samples):
        with torch.no_grad():
            images = torch.stack([transform(open_image(s.image)) for s in samples])
            return model.encode_image(images).numpy(), np.array([s.label for s in samples])

    clf = LogisticRegression(solver="lbfgs", max_iter=1000, C=saved["C"]).fit(*features(splits.train))
    x, y = features(splits.test)
    assert saved["top1"] == pytest.approx(float(np.mean(clf.predict(x) == y)), abs=1.5 / len(y))
    assert saved["results"]["builtin:digits"]["num_test"] == len(y)
    assert 0.2 < saved["top1"] <= 1.0 and math.isfinite(saved["C"])


def test_features_are_cached_and_a_changed_setting_is_refused(tmp_path, monkeypatch):
    linear_probe.run_linear_probe(_cfg(tmp_path))
    cached = sorted(p.name for p in (tmp_path / "run" / "linear_probe" / "features").iterdir())
    assert [name.split("-")[0] for name in cached] == ["test", "train", "val"]

    def no_loader(*args, **kwargs):
        raise AssertionError("features were recomputed")

    monkeypatch.setattr(linear_probe, "make_loader", no_loader)
    (tmp_path / "run" / "linear_probe" / "results.json").unlink()
    again = linear_probe.run_linear_probe(_cfg(tmp_path, probe_steps=1))  # another search, the same features
    assert again["C"] > 0
    with pytest.raises(ValueError, match=r"--resume: .*results\.json was made with other settings \(probe_steps: "
                                         r"1 -> 4\)"):
        linear_probe.run_linear_probe(_cfg(tmp_path, probe_steps=4, resume=True))
    assert linear_probe.run_linear_probe(_cfg(tmp_path, probe_steps=1, resume=True))["top1"] == again["top1"]


def test_the_report_reads_probe_results(tmp_path):
    from fastdpl.pipeline.report import report

    linear_probe.run_linear_probe(_cfg(tmp_path, probe_steps=0))
    md, _ = report([tmp_path / "run"], tmp_path / "summary")
    assert "| linear_probe | linear_probe |" in md.read_text()


@pytest.mark.parametrize("extra,match", [
    (["--probe-steps", "-1"], "probe_steps must be an int >= 0"),
    (["--model", "timm:tiny"], "train its head alone with `fastdpl train --method linear`"),
    (["--dataset", "nowhere"], "unknown dataset 'nowhere'"),
])
def test_bad_settings_give_one_clear_error(tmp_path, capsys, extra, match):
    args = ["linear-probe", "--dataset", "builtin:digits", "--model", "tiny", "--pretrained", "none", "--device", "cpu",
            "--workers", "0", "--progress", "false", "--output", str(tmp_path / "bad"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
