import json

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from workers.core.errors import InvalidJob
from workers.core.job import JobType, OutputKind, Queue, decode

JOB = {"id": "8d5c6f0e-1b2a-4c3d-9e8f-001122334455", "type": "sdxl_image_fast", "prompt": "a cat",
       "user_id": "u-1", "config": {"num_images": 3}, "metadata": None}


def test_three_element_forms_decode_to_the_same_job():
    forms = [json.dumps(JOB), json.dumps([json.dumps(JOB)]), json.dumps([JOB])]
    jobs = [decode(f.encode()) for f in forms]
    assert jobs[0] == jobs[1] == jobs[2]
    assert jobs[0].type is JobType.SDXL_IMAGE_FAST and jobs[0].config["num_images"] == 3
    assert dict(jobs[0].metadata) == {}


def test_job_is_frozen():
    job = decode(json.dumps(JOB))
    with pytest.raises(Exception):
        job.prompt = "x"
    with pytest.raises(TypeError):
        job.config["num_images"] = 6


def test_wan_alias_and_type_behaviour():
    job = decode(json.dumps({**JOB, "type": "wan_video_fast"}))
    assert job.type is JobType.VIDEO_FAST and job.queue is Queue.WAN
    assert job.type.output_kind is OutputKind.VIDEO and job.type.tier == "fast"
    assert JobType.IMAGE7B_HIGH_ENHANCED.enhanced and JobType.IMAGE7B_HIGH_ENHANCED.output_kind is OutputKind.IMAGE
    assert JobType.CHAT_ENHANCE.queue is Queue.CHAT and JobType.ADMIN_UTILITIES.output_kind is OutputKind.TEXT
    assert len(JobType) == 14
    # routed on `type` even when `job_type` says otherwise
    assert decode(json.dumps({**JOB, "type": "video_high", "job_type": "wan_video_high"})).type is JobType.VIDEO_HIGH


def test_job_id_alias_and_lookup_order():
    obj = {k: v for k, v in JOB.items() if k != "id"}
    job = decode(json.dumps({**obj, "job_id": "abc", "config": {"steps": 5}, "metadata": {"steps": 9}}))
    assert job.id == "abc"
    assert job.lookup("config.num_inference_steps", "config.steps", "metadata.steps") == ("config.steps", 5)
    assert job.lookup("config.nothing") is None


@pytest.mark.parametrize("element, message", [
    (b"\xff\xfe", "not UTF-8"),
    ("not json", "not valid JSON"),
    ("[1, 2]", "array of 2 items"),
    ("[]", "array of 0 items"),
    ('["not json inside"]', "not valid JSON"),
    ("42", "must be a JSON object"),
    ('[["x"]]', "must be a JSON object"),
    (json.dumps({k: v for k, v in JOB.items() if k != "id"}), "no 'id'"),
    (json.dumps({**JOB, "id": "../etc"}), "'id' must be"),
    (json.dumps({**JOB, "id": 5}), "'id' must be"),
    (json.dumps({k: v for k, v in JOB.items() if k != "user_id"}), "no 'user_id'"),
    (json.dumps({**JOB, "user_id": "a/b"}), "'user_id' must be"),
    (json.dumps({**JOB, "type": "sdxl_image_ultra"}), "unknown job type"),
    (json.dumps({k: v for k, v in JOB.items() if k != "type"}), "no 'type'"),
    (json.dumps({**JOB, "config": [1]}), "'config' must be an object"),
    (json.dumps({**JOB, "metadata": "x"}), "'metadata' must be an object"),
    (json.dumps({**JOB, "prompt": 5}), "'prompt' must be a string"),
    (json.dumps({**JOB, "negative_prompt": ["x"]}), "'negative_prompt' must be a string"),
    (json.dumps({**JOB, "compel_enabled": "yes"}), "'compel_enabled' must be true or false"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
])
def test_every_defect_has_a_precise_message(element, message):
    with pytest.raises(InvalidJob) as info:
        decode(element)
    assert message in info.value.message


def test_invalid_fields_carry_the_job_id_for_a_failed_callback():
    with pytest.raises(InvalidJob) as info:
        decode(json.dumps({**JOB, "config": "bad"}))
    assert info.value.job_id == JOB["id"]
    with pytest.raises(InvalidJob) as info:
        decode("garbage")
    assert info.value.job_id is None


@hsettings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_decoder(data):
    try:
        decode(data)
    except InvalidJob:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@hsettings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "type", "user_id", "prompt", "config", "metadata",
                                        "negative_prompt", "compel_enabled", "job_id"]), json_values))
def test_arbitrary_json_objects_never_crash_the_decoder(obj):
    for element in (json.dumps(obj), json.dumps([json.dumps(obj)]), json.dumps([obj])):
        try:
            decode(element)
        except InvalidJob:
            pass
