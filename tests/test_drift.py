"""tests/drift.py names every distribution whose version moved since the last green run."""

from tests.drift import drift, read_freeze


def test_drift_names_changed_new_and_gone_distributions_only():
    last = read_freeze("# comment\nTransformers==5.24.0\nkernels_x==1.0\ntorch==2.13.0+cpu\n-e /repo\nsame==1\n")
    now = {"transformers": "5.25.0", "kernels": "0.19.1", "torch": "2.13.0+cpu", "same": "1", "fastmft": "0.2"}
    assert drift(last, now) == ["kernels new 0.19.1", "kernels-x gone (was 1.0)", "transformers 5.24.0 -> 5.25.0"]
    assert drift(last, dict(last)) == []
