"""`tiered tune --fit-trace` shows a progress bar while it fits (it was silent for a minute)."""
from __future__ import annotations

from test_predict import L, synthetic_gates, synthetic_trace
from tiered.predict.predictors import fit_params
from tiered.predict.trace import save


def test_fit_params_draws_a_bar_over_every_optimiser_step(capsys):
    fit_params(synthetic_trace(seed=1), synthetic_gates(), steps=5, progress=True)
    err = capsys.readouterr().err
    assert "fitting predictors" in err and f"{(L - 1) * 5}/{(L - 1) * 5}" in err and f"layer {L - 1}/{L - 1}" in err
    fit_params(synthetic_trace(seed=1), synthetic_gates(), steps=5)
    assert capsys.readouterr().err == ""


def test_tune_fits_with_the_bar(tmp_path, capsys, monkeypatch):
    """The fitting step of `tune` asks for the bar."""
    import tiered.predict.predictors as predictors
    from tiered.cli.tune import load_or_fit_params

    real, seen = predictors.fit_params, []

    def spy(*a, **kw):
        seen.append(kw.get("progress"))
        return real(*a, **{**kw, "steps": 2})

    monkeypatch.setattr(predictors, "fit_params", spy)
    path = save(synthetic_trace(seed=1), tmp_path / "fit.npz")
    load_or_fit_params(None, params_path=tmp_path / "p.safetensors", fit_trace=path, gates=synthetic_gates(),
                       log=lambda *a: None)
    assert seen == [True] and "fitting predictors" in capsys.readouterr().err
