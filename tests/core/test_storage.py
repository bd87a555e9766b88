import io

import pytest
from PIL import Image

from common.errors import ConfigError
from common.settings import Settings
from tests.conftest import SUPABASE_TEST_SERVICE_KEY as KEY
from workers.core.errors import ErrorType, RetryableError, WorkerError
from workers.core.storage import LocalStorage, SupabaseStorage, from_settings, object_path
from workers.media.thumbnail import thumbnail

from .scripted import FakeTime, ScriptedServer


def png(w=300, h=150):
    out = io.BytesIO()
    Image.new("RGB", (w, h), (10, 20, 30)).save(out, format="PNG")
    return out.getvalue()


def test_local_layout(tmp_path):
    storage = LocalStorage(tmp_path, "workspace-temp")
    path = object_path("user-1", "job-1", "0.png")
    assert storage.upload(path, png(), "image/png") == "user-1/job-1/0.png"
    assert (tmp_path / "workspace-temp/user-1/job-1/0.png").read_bytes() == png()


@pytest.mark.parametrize("parts", [("..", "job", "0.png"), ("u", "../x", "0.png"), ("u", "j", "a/b"),
                                   ("/abs", "j", "0.png"), ("", "j", "0.png"), ("u", "j", "x" * 300),
                                   ("u", "j", "..png")])
def test_unsafe_components_are_refused(parts):
    with pytest.raises(WorkerError) as info:
        object_path(*parts)
    assert info.value.error_type is ErrorType.INVALID_JOB


def test_local_storage_refuses_paths_outside_the_layout(tmp_path):
    storage = LocalStorage(tmp_path / "root", "b")
    for path in ("../../etc/x", "u/j/../../x", "/etc/passwd", "u/j"):
        with pytest.raises(WorkerError):
            storage.upload(path, b"x", "image/png")
    assert not any(tmp_path.rglob("x")) and not (tmp_path / "root").exists()


def test_thumbnail_is_webp_256_longest_edge_aspect_kept():
    thumb = Image.open(io.BytesIO(thumbnail(Image.open(io.BytesIO(png(1024, 576))))))
    assert thumb.format == "WEBP" and thumb.size == (256, 144)


def test_supabase_upload_headers_and_upsert(supabase_standin):
    storage = SupabaseStorage(supabase_standin.url, KEY, "workspace-temp", sleep=lambda s: None)
    for content_type, name in (("image/png", "0.png"), ("image/webp", "0.thumb.webp"), ("video/mp4", "0.mp4")):
        storage.upload(f"u/j/{name}", b"data-" + name.encode(), content_type)
        assert supabase_standin.objects[f"workspace-temp/u/j/{name}"] == (b"data-" + name.encode(), content_type)
    storage.upload("u/j/0.png", b"again", "image/png")  # a retry overwrites (x-upsert)
    assert supabase_standin.objects["workspace-temp/u/j/0.png"][0] == b"again"


def test_supabase_retries_5xx_then_succeeds(supabase_standin):
    supabase_standin.fail_storage_next(2, 500)
    SupabaseStorage(supabase_standin.url, KEY, "b", sleep=lambda s: None).upload("u/j/0.png", b"x", "image/png")
    assert "b/u/j/0.png" in supabase_standin.objects


def test_supabase_persistent_5xx_is_retryable_storage_error(supabase_standin):
    supabase_standin.fail_storage_next(10, 500)
    with pytest.raises(RetryableError) as info:
        SupabaseStorage(supabase_standin.url, KEY, "b", sleep=lambda s: None).upload("u/j/0.png", b"x", "image/png")
    assert info.value.error_type is ErrorType.STORAGE_ERROR


def test_supabase_auth_failure_is_a_final_storage_error(supabase_standin):
    with pytest.raises(WorkerError) as info:
        SupabaseStorage(supabase_standin.url, "wrong", "b", sleep=lambda s: None).upload("u/j/0.png", b"x", "image/png")
    assert not isinstance(info.value, RetryableError) and info.value.error_type is ErrorType.STORAGE_ERROR
    assert "wrong" not in info.value.message


def test_octet_stream_is_never_sent(supabase_standin):
    with pytest.raises(WorkerError):
        SupabaseStorage(supabase_standin.url, KEY, "b").upload("u/j/0.bin", b"x", "application/octet-stream")


@pytest.fixture
def scripted():
    server = ScriptedServer()
    yield server
    server.stop()


def test_upload_retries_are_four_tries_with_jittered_backoff(scripted):
    fake = FakeTime()
    scripted.answer(10, 500)
    with pytest.raises(RetryableError) as info:
        SupabaseStorage(scripted.url, KEY, "b", sleep=fake.sleep).upload("u/j/0.png", b"x", "image/png")
    assert "HTTP 500" in info.value.message and len(scripted.requests) == 4
    for n, wait in enumerate(fake.sleeps):  # 1, 2, 4 s, each plus up to 1 s of jitter
        assert 2 ** n <= wait <= 2 ** n + 1, fake.sleeps
    assert len(fake.sleeps) == 3 and any(wait != int(wait) for wait in fake.sleeps), fake.sleeps


@pytest.mark.parametrize("status", [503, 429, 408])
def test_upload_honours_retry_after(scripted, status):
    fake = FakeTime()
    scripted.answer(1, status, Retry_After="6")
    SupabaseStorage(scripted.url, KEY, "b", sleep=fake.sleep).upload("u/j/0.png", b"x", "image/png")
    assert len(scripted.requests) == 2 and fake.sleeps[0] >= 6


def test_upload_gives_up_at_once_on_a_retry_after_past_its_budget(scripted):
    """Longer than the upload's own budget: the job is handed back and retried later, not held here."""
    fake = FakeTime()
    scripted.answer(4, 503, Retry_After="120")
    with pytest.raises(RetryableError):
        SupabaseStorage(scripted.url, KEY, "b", sleep=fake.sleep).upload("u/j/0.png", b"x", "image/png")
    assert len(scripted.requests) == 1 and fake.sleeps == []


def test_storage_retry_first_seconds_scales_the_backoff(scripted):
    """STORAGE_RETRY_FIRST_SECONDS is the first wait (1 s by default); the later ones double from it, each with
    up to as much jitter. The fleet tests shorten it; a wait that is not positive is refused."""
    fake = FakeTime()
    scripted.answer(10, 500)
    settings = Settings.from_env({"SUPABASE_URL": scripted.url, "SUPABASE_SERVICE_KEY": KEY,
                                  "STORAGE_RETRY_FIRST_SECONDS": "0.25"})
    storage = from_settings(settings)
    storage.sleep = fake.sleep
    with pytest.raises(RetryableError):
        storage.upload("u/j/0.png", b"x", "image/png")
    assert len(scripted.requests) == 4 and len(fake.sleeps) == 3, fake.sleeps
    for n, wait in enumerate(fake.sleeps):
        assert 0.25 * 2 ** n <= wait <= 0.25 * 2 ** n + 0.25, fake.sleeps
    assert Settings.from_env({}).storage_retry_first_seconds == 1.0
    with pytest.raises(ConfigError, match="STORAGE_RETRY_FIRST_SECONDS"):
        Settings.from_env({"STORAGE_RETRY_FIRST_SECONDS": "0"})
    with pytest.raises(ValueError, match="retry_first"):
        SupabaseStorage(scripted.url, KEY, "b", retry_first=0)
