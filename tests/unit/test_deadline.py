"""The default generation deadline (a pure function of the payload) and the Deadline clock engines check."""

from __future__ import annotations

from typing import Any

import pytest

from sdasync.engines.deadline import DEFAULT_BASE_S, DEFAULT_PER_STEP_MEGAPIXEL_S, Deadline, default_deadline_s
from sdasync.errors import EngineTimeout

SD15 = {"steps": 20, "width": 512, "height": 512}


def test_formula_for_the_webui_defaults() -> None:
    megapixels = 512 * 512 / 1e6
    expected = DEFAULT_BASE_S + DEFAULT_PER_STEP_MEGAPIXEL_S * 20 * megapixels
    assert default_deadline_s(SD15) == pytest.approx(expected)
    assert default_deadline_s({}) == pytest.approx(expected)  # missing fields are the WebUI's defaults
    assert default_deadline_s(SD15) == pytest.approx(81.0, abs=0.1)


def test_grows_linearly_with_steps_pixels_and_images() -> None:
    work = default_deadline_s(SD15) - DEFAULT_BASE_S
    assert default_deadline_s({**SD15, "steps": 40}) - DEFAULT_BASE_S == pytest.approx(2 * work)
    assert default_deadline_s({**SD15, "width": 1024, "height": 1024}) - DEFAULT_BASE_S == pytest.approx(4 * work)
    assert default_deadline_s({**SD15, "batch_size": 2, "n_iter": 3}) - DEFAULT_BASE_S == pytest.approx(6 * work)


def test_generous_for_a_slow_gpu() -> None:
    # SDXL, 30 steps, 1024x1024, batch of 4: about 2 s a step on a T4 -> about 4 minutes of sampling.
    sdxl = {"steps": 30, "width": 1024, "height": 1024, "batch_size": 4}
    assert default_deadline_s(sdxl) > 2 * 4 * 30 * 2.0
    assert default_deadline_s(sdxl) == pytest.approx(563.3, abs=0.1)


def test_second_order_samplers_and_hires_fix_count_double_work() -> None:
    work = default_deadline_s(SD15) - DEFAULT_BASE_S
    for sampler in ("Heun", "DPM2 a", "DPM++ SDE Karras", "DPM++ 2S a"):
        assert default_deadline_s({**SD15, "sampler_name": sampler}) - DEFAULT_BASE_S == pytest.approx(2 * work)
    assert default_deadline_s({**SD15, "sampler_name": "DPM++ 2M"}) == default_deadline_s(SD15)
    # hires at 2x: the same steps again at 4x the pixels.
    assert default_deadline_s({**SD15, "enable_hr": True}) - DEFAULT_BASE_S == pytest.approx(5 * work)
    hires = {**SD15, "enable_hr": True, "hr_second_pass_steps": 10, "hr_resize_x": 1024, "hr_resize_y": 512}
    assert default_deadline_s(hires) - DEFAULT_BASE_S == pytest.approx(2 * work)


def test_knobs_scale_the_formula() -> None:
    assert default_deadline_s(SD15, base_s=0, per_step_megapixel_s=1.0) == pytest.approx(20 * 0.262144)
    assert default_deadline_s(SD15, base_s=10, per_step_megapixel_s=0) == 10


@pytest.mark.parametrize(
    "payload",
    [
        {"steps": "many", "width": None, "height": -5, "batch_size": True, "n_iter": float("nan")},
        {"sampler_name": 3, "enable_hr": "yes"},
    ],
)
def test_malformed_fields_fall_back_to_defaults(payload: dict[str, Any]) -> None:
    assert default_deadline_s(payload) == default_deadline_s({})


def test_deadline_clock() -> None:
    none = Deadline(None)
    assert none.remaining() is None
    assert none.cap(7.0) == 7.0
    assert not none.expired
    none.check()

    later = Deadline(60, task_id="t1")
    remaining = later.remaining()
    assert remaining is not None
    assert 59 < remaining <= 60
    assert later.cap(5.0) == 5.0
    assert later.cap(600.0) <= 60
    later.check()

    spent = Deadline(0, task_id="t2")  # the monotonic clock never goes back: expired at once
    assert spent.expired
    assert spent.remaining() == 0.0
    assert spent.cap(5.0) == 0.0
    with pytest.raises(EngineTimeout, match=r"task t2 exceeded its deadline of 0 s at step 3") as caught:
        spent.check("at step 3")
    assert caught.value.retryable
