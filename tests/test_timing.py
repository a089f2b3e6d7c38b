"""timing.repeats: the pruning span timed several times on fresh copies, every repeat recorded, one result kept."""

from __future__ import annotations

import pytest
import torch

from gradmap import prune
from tests.conftest import make_calib, make_tiny


def test_repeats_prune_fresh_copies_and_record_every_span():
    calib = make_calib()
    once = prune(make_tiny(), calib, method="gradmap", n_remove=2)
    model = make_tiny()
    res = prune(model, calib, method="gradmap", n_remove=2, repeats=3)
    t = res.timings
    assert t["repeats"] == 3 and len(t["prune_s_repeats"]) == 3 and len(t["select_s_repeats"]) == 3
    assert t["prune_s_repeats"][-1] == pytest.approx(t["prune_s"]), "the kept result is the last repeat's"
    assert t["prune_s_min"] == min(t["prune_s_repeats"]) and t["repeats_same_layers"] is True
    assert all(a + b == pytest.approx(c) for a, b, c in zip(t["select_s_repeats"], t["repair_s_repeats"],
                                                             t["prune_s_repeats"]))  # fmt: skip
    # the extra repeats pruned copies: the model was pruned once, exactly as a single run prunes it
    assert res.removed_layers == once.removed_layers and len(model.model.layers) == 6
    x = calib[:1]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, once.model(input_ids=x).logits)
    assert "repeats" not in once.timings
    with pytest.raises(ValueError, match=r"timing\.repeats=0"):
        prune(make_tiny(), calib, method="gradmap", n_remove=2, repeats=0)
