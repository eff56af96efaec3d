"""What identifies a result for the cache, and where a result goes."""

from __future__ import annotations

import numpy as np
import pytest

from higgs_worker.errors import RequestPlanError
from higgs_worker.job.plan import cache_identity, s3_target_for
from higgs_worker.job.schema import RequestLimits, parse_request
from higgs_worker.settings import load_settings
from higgs_worker.voices.resolve import ReferenceAudio

LIMITS = RequestLimits(1000, 4096)


def request(**fields):
    return parse_request({"transcript": "Hello.", **fields}, LIMITS)


def reference(value: float) -> ReferenceAudio:
    return ReferenceAudio(np.full(100, value, dtype=np.float32), 24000, "words", "test")


def test_only_deterministic_requests_have_an_identity() -> None:
    assert cache_identity(request(), []) is None
    assert cache_identity(request(seed=1), []) is not None
    assert cache_identity(request(temperature=0), []) is not None


def test_identity_follows_what_shapes_the_audio() -> None:
    base = cache_identity(request(seed=1), [])
    assert cache_identity(request(seed=1, s3_bucket="bucket", return_base64=True), []) == base
    assert cache_identity(request(seed=2), []) != base
    assert cache_identity(request(seed=1, output_format="flac"), []) != base
    assert cache_identity(request(seed=1, speed=1.5), []) != base
    # greedy decoding ignores the sampling knobs, so they do not split the cache
    assert cache_identity(request(temperature=0, top_p=0.5), []) == cache_identity(request(temperature=0), [])


def test_identity_uses_the_reference_audio_not_its_name() -> None:
    one = cache_identity(request(seed=1, ref_audio="voice"), [reference(0.1)])
    same = cache_identity(request(seed=1, ref_audio="renamed"), [reference(0.1)])
    changed = cache_identity(request(seed=1, ref_audio="voice"), [reference(0.2)])
    assert one == same and one != changed


def test_s3_target_from_the_job_or_the_default_bucket() -> None:
    settings = load_settings({"RUNPOD_VOLUME_PATH": "/tmp/v"})
    assert s3_target_for(request(), "job-1", settings) is None
    target = s3_target_for(request(s3_bucket="my-bucket"), "job-1", settings)
    assert target.bucket == "my-bucket" and target.key.endswith("job-1.wav")
    default = load_settings({"RUNPOD_VOLUME_PATH": "/tmp/v", "S3_BUCKET": "fallback"})
    assert s3_target_for(request(s3_key="a/b.wav"), "job-1", default).bucket == "fallback"
    with pytest.raises(RequestPlanError, match="s3_key"):
        s3_target_for(request(s3_key="a/b.wav"), "job-1", settings)
    with pytest.raises(RequestPlanError, match="s3_bucket"):
        s3_target_for(request(s3_bucket="Not_A_Bucket"), "job-1", settings)


def test_the_prompt_version_is_part_of_the_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Results made before a change to what the model reads are not served for the same request after it."""
    from higgs_worker.job import plan as request_plan

    before = cache_identity(request(seed=1), [])
    monkeypatch.setattr(request_plan, "PROMPT_VERSION", request_plan.PROMPT_VERSION + 1)
    after = cache_identity(request(seed=1), [])
    assert before is not None and after is not None and before != after


def test_the_sampler_is_part_of_a_seeded_identity_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeded results drawn another way (before a sampler change, or by the other backend) are not served;
    greedy ones, which the sampler does not touch, still are."""
    from higgs_worker.job import plan as request_plan

    seeded, greedy = cache_identity(request(seed=1), []), cache_identity(request(temperature=0), [])
    assert cache_identity(request(seed=1), [], backend="transformers") != seeded  # generate() draws others
    assert cache_identity(request(temperature=0), [], backend="transformers") == greedy
    monkeypatch.setattr(request_plan, "SAMPLER_VERSION", request_plan.SAMPLER_VERSION + 1)
    assert cache_identity(request(seed=1), []) != seeded
    assert cache_identity(request(temperature=0), []) == greedy


def test_a_compiled_decode_step_is_part_of_the_identity() -> None:
    """torch.compile's fused kernels round otherwise, so even greedy codes may differ from the eager step's:
    neither answers for the other. transformers' generate() is never compiled, so its identity stays."""
    for fields in ({"seed": 1}, {"temperature": 0}):
        eager = cache_identity(request(**fields), [])
        assert cache_identity(request(**fields), [], compiled_step=True) != eager
        reference = cache_identity(request(**fields), [], backend="transformers")
        assert cache_identity(request(**fields), [], backend="transformers", compiled_step=True) == reference


def test_the_quality_models_and_a_live_stream_are_part_of_the_identity_only_where_they_shape_it() -> None:
    """Another aligner gives other words, another recogniser another verdict; a live stream levels its
    loudness from its start and aligns chunk by chunk, so it never answers for a clip finished whole."""
    one = {"aligner": "org/aligner-a@main", "recogniser": "org/whisper@main"}
    other = {"aligner": "org/aligner-b@main", "recogniser": "org/whisper-large@main"}

    def identity(fields: dict, models: dict = one, live: bool = False) -> dict | None:
        return cache_identity(request(seed=1, **fields), [], quality_models=models, live_stream=live)

    plain = identity({})
    assert plain == identity({}, other, live=True)  # neither asked for: the identity is what it was
    assert identity({"timestamps": "word"}) != identity({"timestamps": "word"}, other)
    assert identity({"verify": True}) != identity({"verify": True}, other)
    assert identity({"trim_silence": True}) == identity({"trim_silence": True}, other)
    for fields in ({"loudness_lufs": -20.0}, {"captions": "srt"}):
        assert identity(fields) != identity(fields, live=True)
    assert identity({"verify": True}) == identity({"verify": True}, live=True)
