"""Queue settings: keyword arguments, qlog.toml in the data directory,
Cloudflare's defaults, and the errors bad settings raise."""

from __future__ import annotations

import pathlib
from typing import Callable

import pytest

import qlog

QUEUE = "jobs"
TOML = pytest.mark.local_only("qlog.toml lives in the data directory")


def write_toml(data_dir: pathlib.Path, text: str) -> None:
    data_dir.mkdir(exist_ok=True)
    (data_dir / "qlog.toml").write_text(text)


def settings_of(make_broker: Callable[..., qlog.Broker], name: str = QUEUE, **kwargs) -> qlog.QueueSettings:
    with make_broker() as b:
        return b.queue(name, **kwargs).settings


ALL_KEYS = """
[[queues.consumers]]
queue = "jobs"
max_batch_size = 50
max_batch_timeout = 2.5
max_retries = 7
dead_letter_queue = "jobs-dlq"
retry_delay = 12
delivery_delay = 3
message_retention = 3600
visibility_timeout = 45.5
max_message_size = 2048
max_concurrency = 4
durability = "none"
allow_pickle = true
segment_bytes = 1048576
"""


def test_defaults_are_cloudflares(make_broker):
    s = settings_of(make_broker)
    assert s == qlog.QueueSettings()
    assert (s.max_batch_size, s.max_batch_timeout, s.max_retries, s.dead_letter_queue) == (10, 5.0, 3, None)
    assert (s.retry_delay, s.delivery_delay, s.message_retention) == (0, 0, 4 * 86_400)
    assert (s.visibility_timeout, s.max_message_size, s.max_concurrency) == (30.0, 131072, 1)
    assert (s.durability, s.allow_pickle) == (None, False)


@TOML
def test_toml_consumer_settings_are_applied(data_dir, make_broker):
    write_toml(data_dir, ALL_KEYS)
    s = settings_of(make_broker)
    assert s == qlog.QueueSettings(
        max_batch_size=50, max_batch_timeout=2.5, max_retries=7, dead_letter_queue="jobs-dlq",
        retry_delay=12, delivery_delay=3, message_retention=3600, visibility_timeout=45.5,
        max_message_size=2048, max_concurrency=4, durability="none", allow_pickle=True,
        segment_bytes=1048576,
    )
    assert settings_of(make_broker, "other") == qlog.QueueSettings()


@TOML
def test_toml_settings_take_effect_on_the_queue(data_dir, make_broker):
    write_toml(data_dir, ALL_KEYS)
    with make_broker() as b:
        q = b.queue(QUEUE)
        assert q.durability == "none"
        with pytest.raises(qlog.MessageTooLargeError, match="2048"):
            q.send(b"x" * 2049, content_type="bytes")
        q.send({"p": 1}, content_type="pickle", delay_seconds=0)
        assert [m.body for m in q.pull()] == [{"p": 1}]


@TOML
def test_toml_producer_settings_are_applied(data_dir, make_broker):
    write_toml(data_dir, """
[[queues.producers]]
queue = "jobs"
delivery_delay = 5
[[queues.consumers]]
queue = "jobs"
max_retries = 1
""")
    s = settings_of(make_broker)
    assert (s.delivery_delay, s.max_retries) == (5, 1)


@TOML
def test_toml_top_level_durability_applies_to_every_queue(data_dir, make_broker):
    write_toml(data_dir, """
durability = "interval"
[[queues.consumers]]
queue = "fast"
durability = "none"
""")
    with make_broker() as b:
        assert b.queue(QUEUE).durability == "interval"
        assert b.queue("fast").durability == "none"


@TOML
def test_toml_unlimited_message_retention(data_dir, make_broker):
    write_toml(data_dir, '[[queues.consumers]]\nqueue = "jobs"\nmessage_retention = "unlimited"\n')
    assert settings_of(make_broker).message_retention is None


@TOML
def test_kwargs_override_toml(data_dir, make_broker):
    write_toml(data_dir, ALL_KEYS)
    s = settings_of(make_broker, max_retries=2, visibility_timeout=1, dead_letter_queue=None)
    assert (s.max_retries, s.visibility_timeout, s.dead_letter_queue) == (2, 1.0, None)
    assert s.max_batch_size == 50  # the rest still comes from the file


@pytest.mark.parametrize(
    "text, key",
    [
        ('[[queues.consumers]]\nqueue = "jobs"\nmax_retry = 3\n', "max_retry"),
        ('[[queues.producers]]\nqueue = "jobs"\ncolour = "red"\n', "colour"),
        ('[[queues.consumers]]\nqueue = "jobs"\nqueue_name = "x"\n', "queue_name"),
        ('durabilty = "none"\n', "durabilty"),
        ('[[queues.workers]]\nqueue = "jobs"\n', "workers"),
    ],
    ids=["consumer-key", "producer-key", "similar-key", "top-level", "section"],
)
@TOML
def test_unknown_toml_key_raises_settings_error_naming_it(data_dir, make_broker, text, key):
    write_toml(data_dir, text)
    with pytest.raises(qlog.SettingsError, match=key):
        make_broker()


@pytest.mark.parametrize(
    "key, value",
    [
        ("max_retries", '"3"'),
        ("max_batch_size", "10.5"),
        ("max_message_size", "true"),
        ("visibility_timeout", '"30s"'),
        ("allow_pickle", "1"),
        ("durability", '"fast"'),
        ("retry_delay", "[1]"),
    ],
)
@TOML
def test_toml_value_of_the_wrong_type_raises_settings_error_naming_the_key(data_dir, make_broker, key, value):
    write_toml(data_dir, f'[[queues.consumers]]\nqueue = "jobs"\n{key} = {value}\n')
    with pytest.raises(qlog.SettingsError, match=key):
        make_broker()


OUT_OF_RANGE = [
    ("max_batch_size", 0), ("max_batch_size", 101),
    ("max_batch_timeout", -1), ("max_batch_timeout", 61),
    ("max_retries", -1), ("max_retries", 101),
    ("retry_delay", -1), ("retry_delay", 86_401),
    ("delivery_delay", -1), ("delivery_delay", 86_401),
    ("message_retention", 59), ("message_retention", 1_209_601),
    ("visibility_timeout", 0), ("visibility_timeout", 43_201),
    ("max_message_size", 0), ("max_message_size", (16 << 20) + 1),
    ("max_concurrency", 0), ("max_concurrency", 251),
    ("segment_bytes", 65_535),
]


@pytest.mark.parametrize("key, value", OUT_OF_RANGE)
@TOML
def test_toml_value_out_of_range_raises_settings_error_naming_the_key(data_dir, make_broker, key, value):
    write_toml(data_dir, f'[[queues.consumers]]\nqueue = "jobs"\n{key} = {value}\n')
    with pytest.raises(qlog.SettingsError, match=key):
        make_broker()


@pytest.mark.parametrize("key, value", OUT_OF_RANGE + [("retry_delay", float("nan"))])
def test_keyword_value_out_of_range_raises_settings_error_naming_the_key(make_broker, key, value):
    with make_broker() as b:
        with pytest.raises(qlog.SettingsError, match=key):
            b.queue(QUEUE, **{key: value})


def test_unknown_keyword_setting_raises_settings_error_naming_it(make_broker):
    with make_broker() as b:
        with pytest.raises(qlog.SettingsError, match="max_retry"):
            b.queue(QUEUE, max_retry=3)
        with pytest.raises(qlog.SettingsError, match="max_retries"):
            b.queue(QUEUE, max_retries="3")


def test_limits_themselves_are_accepted(make_broker):
    with make_broker() as b:
        for key, lo, hi in [("max_batch_size", 1, 100), ("max_retries", 0, 100),
                            ("message_retention", 60, 1_209_600), ("visibility_timeout", 0.001, 43_200),
                            ("retry_delay", 0, 86_400), ("max_concurrency", 1, 250)]:
            assert getattr(b.queue(QUEUE, **{key: lo}).settings, key) == lo
            assert getattr(b.queue(QUEUE, **{key: hi}).settings, key) == hi


def test_queue_as_its_own_dead_letter_queue_raises_settings_error(make_broker):
    with make_broker() as b:
        with pytest.raises(qlog.SettingsError, match="dead_letter_queue"):
            b.queue(QUEUE, dead_letter_queue=QUEUE)
        assert b.queues() == []


@TOML
def test_queue_as_its_own_dead_letter_queue_in_qlog_toml_raises_settings_error(data_dir, make_broker):
    write_toml(data_dir, '[[queues.consumers]]\nqueue = "jobs"\ndead_letter_queue = "jobs"\n')
    with make_broker() as b:
        with pytest.raises(qlog.SettingsError, match="dead_letter_queue"):
            b.queue(QUEUE)


def test_invalid_dead_letter_queue_name_is_refused(make_broker):
    with make_broker() as b:
        with pytest.raises(qlog.InvalidQueueNameError):
            b.queue(QUEUE, dead_letter_queue="../elsewhere")


@TOML
def test_invalid_dead_letter_queue_name_in_qlog_toml_is_refused(data_dir, make_broker):
    write_toml(data_dir, '[[queues.consumers]]\nqueue = "jobs"\ndead_letter_queue = "a/b"\n')
    with pytest.raises(qlog.InvalidQueueNameError):
        make_broker()


@pytest.mark.parametrize(
    "text, error, match",
    [
        ("[[queues.consumers]]\nmax_retries = 3\n", qlog.SettingsError, "queue"),
        ('[[queues.consumers]]\nqueue = "../x"\n', qlog.InvalidQueueNameError, "63"),
        ("[[queues.consumers]\nqueue = \n", qlog.SettingsError, "qlog.toml"),
        ('queues = 5\n', qlog.SettingsError, "queues"),
        ('[queues]\nconsumers = 5\n', qlog.SettingsError, "consumers"),
    ],
    ids=["no-queue", "bad-queue-name", "malformed", "queues-not-a-table", "consumers-not-an-array"],
)
@TOML
def test_bad_toml_file_is_refused_naming_the_problem(data_dir, make_broker, text, error, match):
    write_toml(data_dir, text)
    with pytest.raises(error, match=match):
        make_broker()


@pytest.mark.parametrize("durability", ["fast", None, ""])
def test_open_with_unknown_durability_raises_settings_error(make_broker, durability):
    with pytest.raises(qlog.SettingsError, match="durability"):
        make_broker(durability=durability)


def test_changing_durability_of_an_open_queue_raises_settings_error(make_broker):
    with make_broker() as b:
        b.queue(QUEUE)
        with pytest.raises(qlog.SettingsError, match="durability"):
            b.queue(QUEUE, durability="none")
        with pytest.raises(qlog.SettingsError, match="segment_bytes"):
            b.queue(QUEUE, segment_bytes=1 << 20)


def test_pull_options_out_of_range_raise(make_broker):
    with make_broker() as b:
        q = b.queue(QUEUE)
        with pytest.raises(qlog.SettingsError, match="visibility_timeout"):
            q.pull(visibility_timeout=0)
        with pytest.raises(qlog.SettingsError, match="visibility_timeout"):
            q.pull(visibility_timeout=43_201)
        with pytest.raises(qlog.SettingsError, match="wait"):
            q.pull(wait=-1)


@TOML
def test_toml_two_consumer_blocks_for_one_queue_are_an_error_not_a_merge(data_dir, make_broker):
    write_toml(data_dir, '[[queues.consumers]]\nqueue = "jobs"\nmax_retries = 1\n\n'
                         '[[queues.consumers]]\nqueue = "other"\n\n'
                         '[[queues.consumers]]\nqueue = "jobs"\nmax_batch_size = 5\n')
    with pytest.raises(qlog.SettingsError, match=r"'jobs' has two \[\[queues.consumers\]\] blocks .*#1 and #3"):
        make_broker()
