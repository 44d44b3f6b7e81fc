"""Admission: refusals past the limit, and slots given back."""

import pytest

from llava_serve.api.admission import Admission
from llava_serve.config import AdmissionConfig
from llava_serve.errors import Overloaded


def test_admission_refuses_past_the_limit_and_frees_slots():
    admission = Admission(AdmissionConfig(max_inflight_requests=2, retry_after_s=3))
    with admission.slot(), admission.slot():
        with pytest.raises(Overloaded) as info, admission.slot():
            pass
        assert info.value.retry_after_s == 3 and "2 requests in flight" in info.value.message
    assert admission.inflight == 0
    with admission.slot():  # free again
        assert admission.inflight == 1
    unlimited = Admission(AdmissionConfig(max_inflight_requests=0))
    with unlimited.slot(), unlimited.slot(), unlimited.slot():
        assert unlimited.inflight == 3
