import numpy as np
import pytest
import torch

from detector.config import load_config
from detector.engine import Engine
from detector.events import EventBatch
from detector.model import Forecaster, ForecasterConfig
from detector.train import History, StreamHistory, fit


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
def test_streaming_forecasts_match_sequence_forecasts(cell):
    torch.manual_seed(0)
    model = Forecaster(
        ForecasterConfig(
            n_features=2, cell=cell, hidden_size=8, num_layers=2, n_attrs=2, attr_buckets=16
        )
    ).eval()
    x = torch.randn(3, 6, 2)
    attrs = torch.randint(0, 16, (3, 7, 2))  # one more step: the attrs of the last forecast event
    with torch.no_grad():
        mean, logvar, _ = model(x, attrs[:, :-1], None, attrs[:, 1:])
        state = model.initial_state(3)
        for t in range(6):
            state = model.step(x[:, t], attrs[:, t], state)
            step_mean, step_logvar = model.predict(state, attrs[:, t + 1])
            torch.testing.assert_close(step_mean, mean[:, t], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(step_logvar, logvar[:, t], atol=1e-5, rtol=1e-5)


def test_the_forecast_knows_the_category_of_the_event_it_forecasts():
    # Amounts depend only on the event's own category, drawn at random: nothing in the past
    # predicts the next amount, its category does.
    rng = np.random.default_rng(0)
    price = np.array([10.0, 100.0])
    streams = []
    for i in range(8):
        category = rng.integers(0, 2, 200)
        amount = price[category] * rng.lognormal(0.0, 0.05, 200)
        streams.append(
            StreamHistory(f"acct-{i}", amount[:, None].astype(np.float32), category[:, None])
        )
    history = History(streams, ["amount"], ["category"], 8 * 200, 0)
    config = ForecasterConfig(n_features=1, hidden_size=8, n_attrs=1, attr_buckets=2)
    settings = load_config(None)
    train = settings.train.model_copy(update={"batch_streams": 2, "window": 32})
    settings = settings.model_copy(update={"train": train})
    result = fit(history, config, settings, epochs=6, seed=0, progress=False)

    engine = Engine(result.model)
    n = 60
    category = rng.integers(0, 2, n)
    amount = price[category] * rng.lognormal(0.0, 0.05, n)
    engine.step_many(
        EventBatch(
            ["new"] * n, np.arange(n, dtype=np.float64), amount[:, None].astype(np.float32),
            category[:, None],
        )
    )  # fmt: skip
    expected = [
        engine.step_many(
            EventBatch(
                ["new"], np.array([n + 1.0]), np.array([[price[c]]], np.float32), np.array([[c]])
            )
        ).expected[0, 0]
        for c in (0, 1)
    ]
    assert expected[0] == pytest.approx(10.0, rel=0.3)
    assert expected[1] == pytest.approx(100.0, rel=0.3)
