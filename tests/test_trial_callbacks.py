"""The driver's Tune callbacks (rayline.trial_lines): what a run's driver keeps."""

import collections
import json

from ray.tune.utils.serialization import TuneFunctionEncoder
from ray.util import debug

from rayline.trial_lines import ForgetEncodedStates


def encoded_keys() -> list[str]:
    return [key for key in debug._logged if key.startswith(ForgetEncodedStates.PREFIX)]


def test_tunes_state_encoder_keys_are_forgotten_at_each_result():
    """Tune's experiment-state encoder keeps a key per distinct text of a value JSON
    cannot hold (a metric's window of recent values, new at each save): 50 saves, 50
    keys, for ever. The callback forgets them and nothing else."""
    debug.log_once("rayline-test-another-key")
    for save in range(50):
        window = collections.deque([save, save + 0.5], maxlen=5)
        json.dumps({"metric_n_steps": {"loss": {"5": window}}}, cls=TuneFunctionEncoder)
    assert len(encoded_keys()) >= 50  # the growth, as Tune has it
    ForgetEncodedStates().on_trial_result(1, [], None, {})
    assert encoded_keys() == []
    assert "rayline-test-another-key" in debug._logged
