"""Settings: TOML plus PW_<SECTION>__<KEY> overrides; every problem names its key; secrets stay masked."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from worker.config import Settings, load_settings, redacted
from worker.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "worker.example.toml"
MINIMAL = '[personalize]\ntracking_id = "tracker-1"\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "worker.toml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path | None, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={} if environ is None else environ)
    return str(info.value)


def test_example_config_loads_with_documented_defaults() -> None:
    settings = load_settings(EXAMPLE, environ={})
    assert settings.personalize.tracking_id == "00000000-0000-0000-0000-000000000000"
    assert settings.kafka.topics == ("clickstream",)
    assert settings.mapping.properties == ("ctx.page_category", "ctx.device_type")
    assert settings.mapping.event_types == {}
    assert settings.batching.max_events == 10
    assert settings.dedup.window_seconds == 3600.0
    assert settings.dead_letter.topic == "clickstream.dlq"


def test_minimal_config_fills_every_default(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL), environ={})
    assert settings.personalize.tracking_id == "tracker-1"
    assert settings.kafka.bootstrap_servers == "localhost:9092"
    assert settings.mapping.sent_at == "timestamp"


def test_environment_alone_is_enough() -> None:
    settings = load_settings(None, environ={"PW_PERSONALIZE__TRACKING_ID": "from-env"})
    assert settings.personalize.tracking_id == "from-env"


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL), environ={})
    with pytest.raises(ValueError, match="frozen"):
        settings.kafka.group_id = "other"


def test_environment_overrides_toml_and_is_coerced(tmp_path: Path) -> None:
    environ = {
        "PW_KAFKA__BOOTSTRAP_SERVERS": "broker:9092",
        "PW_KAFKA__TOPICS": " a, b ,,c ",
        "PW_KAFKA__MAX_POLL_RECORDS": "500",
        "PW_MAPPING__PROPERTIES": '["x.page_category"]',
        "PW_MAPPING__EVENT_TYPES": '{"add_to_cart": "AddToCart"}',
        "PW_MAPPING__EVENT_TYPES_ONLY": "true",
        "PW_PERSONALIZE__MAX_REQUESTS_PER_SECOND": "250.5",
        "PW_BATCHING__LINGER_MS": "0",
        "PW_WORKER__LOG_LEVEL": "DEBUG",
        "OTHER_VARIABLE": "ignored",
        "pw_kafka__group_id": "ignored: the prefix is upper case",
    }
    settings = load_settings(write(tmp_path, MINIMAL + '[kafka]\ngroup_id = "g"\n'), environ=environ)
    assert settings.kafka.bootstrap_servers == "broker:9092"
    assert settings.kafka.topics == ("a", "b", "c")
    assert settings.kafka.max_poll_records == 500
    assert settings.kafka.group_id == "g"  # kept from TOML: overrides merge per key
    assert settings.mapping.properties == ("x.page_category",)
    assert settings.mapping.event_types == {"add_to_cart": "AddToCart"}
    assert settings.mapping.event_types_only is True
    assert settings.personalize.max_requests_per_second == 250.5
    assert settings.personalize.tracking_id == "tracker-1"
    assert settings.batching.linger_ms == 0
    assert settings.worker.log_level == "DEBUG"


def test_json_list_override_for_topics() -> None:
    settings = load_settings(None, environ={"PW_PERSONALIZE__TRACKING_ID": "t", "PW_KAFKA__TOPICS": '["a.b", "c"]'})
    assert settings.kafka.topics == ("a.b", "c")
    # JSON is not split at commas: the element stays one (invalid) topic name, and says so.
    message = error_of(None, {"PW_PERSONALIZE__TRACKING_ID": "t", "PW_KAFKA__TOPICS": '["a,b", "c"]'})
    assert "kafka.topics: 'a,b' is not a valid Kafka topic name" in message


@pytest.mark.parametrize(
    ("toml", "environ", "named"),
    [
        (MINIMAL + "[kafka]\nbootstrap_server = 'x'\n", {}, "kafka.bootstrap_server: unknown key"),
        (MINIMAL + "[kafak]\n", {}, "kafak: unknown key"),
        (MINIMAL, {"PW_KAFKA__TOPIC": "a"}, "kafka.topic: unknown key"),
        (MINIMAL, {"PW_NOPE__X": "1"}, "nope: unknown key"),
        ("", {}, "personalize: required key is missing"),
        ("[personalize]\n", {}, "personalize.tracking_id: required key is missing"),
        ('[personalize]\ntracking_id = ""\n', {}, "personalize.tracking_id"),
        (f'[personalize]\ntracking_id = "{"t" * 257}"\n', {}, "personalize.tracking_id"),
        (MINIMAL + "[batching]\nmax_events = 11\n", {}, "batching.max_events"),
        (MINIMAL + "[batching]\nmax_events = 0\n", {}, "batching.max_events"),
        (MINIMAL, {"PW_BATCHING__MAX_EVENTS": "ten"}, "batching.max_events"),
        (MINIMAL, {"PW_KAFKA__AUTO_OFFSET_RESET": "newest"}, "kafka.auto_offset_reset"),
        (MINIMAL, {"PW_KAFKA__TOPICS": ""}, "kafka.topics"),
        (MINIMAL, {"PW_KAFKA__TOPICS": "clickstream.dlq"}, "dead_letter.topic"),
        (MINIMAL, {"PW_MAPPING__SESSION_ID": ""}, "mapping.session_id"),
        (MINIMAL, {"PW_MAPPING__SENT_AT_FORMAT": "rfc2822"}, "mapping.sent_at_format"),
        (MINIMAL, {"PW_MAPPING__EVENT_TYPES_ONLY": "true"}, "event_types"),
        (MINIMAL, {"PW_MAPPING__EVENT_TYPES": '{"a": ""}'}, "mapping.event_types"),
        (MINIMAL, {"PW_MAPPING__METRIC_ATTRIBUTION_SOURCE_VALUE": "café"}, "metric_attribution_source_value"),
        (MINIMAL, {"PW_PERSONALIZE__MAX_IN_FLIGHT": "0"}, "personalize.max_in_flight"),
        (MINIMAL, {"PW_DEDUP__WINDOW_SECONDS": "-1"}, "dedup.window_seconds"),
        (MINIMAL, {"PW_METRICS__PORT": "70000"}, "metrics.port"),
        (MINIMAL + "[kafka]\nsecurity_protocol = 'SASL_SSL'\n", {}, "sasl_mechanism"),
        (
            MINIMAL + "[kafka]\nsecurity_protocol = 'SASL_SSL'\nsasl_mechanism = 'SCRAM-SHA-512'\n",
            {},
            "sasl_username and sasl_password",
        ),
        (
            MINIMAL + "[kafka]\nsecurity_protocol = 'SASL_PLAINTEXT'\nsasl_mechanism = 'PLAIN'\n",
            {"PW_KAFKA__SASL_USERNAME": "worker"},
            "sasl_password",
        ),
    ],
)
def test_invalid_configuration_names_the_key(tmp_path: Path, toml: str, environ: dict[str, str], named: str) -> None:
    message = error_of(write(tmp_path, toml), environ)
    assert message.startswith("invalid configuration:")
    assert named in message


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "[kafka]\nbogus = 1\n[batching]\nmax_events = 99\n"))
    assert "kafka.bogus: unknown key" in message
    assert "batching.max_events" in message
    assert "personalize: required key is missing" in message


@pytest.mark.parametrize("name", ["PW_KAFKA", "PW_KAFKA__SASL__USERNAME", "PW___X", "PW_KAFKA__"])
def test_malformed_override_names_are_refused(name: str) -> None:
    assert name in error_of(None, {"PW_PERSONALIZE__TRACKING_ID": "t", name: "x"})


def test_override_with_bad_json_names_the_variable() -> None:
    message = error_of(None, {"PW_PERSONALIZE__TRACKING_ID": "t", "PW_MAPPING__EVENT_TYPES": "{nope"})
    assert "PW_MAPPING__EVENT_TYPES" in message


def test_missing_file_and_bad_toml_are_config_errors(tmp_path: Path) -> None:
    assert "not found" in error_of(tmp_path / "absent.toml")
    assert "not valid TOML" in error_of(write(tmp_path, "[kafka\n"))


def test_sasl_with_credentials_is_accepted_and_the_password_masked(tmp_path: Path) -> None:
    secret = "s3cr3t-Pa55"
    toml = MINIMAL + "[kafka]\nsecurity_protocol = 'SASL_SSL'\nsasl_mechanism = 'SCRAM-SHA-512'\n"
    environ = {"PW_KAFKA__SASL_USERNAME": "worker", "PW_KAFKA__SASL_PASSWORD": secret}
    settings = load_settings(write(tmp_path, toml), environ=environ)
    assert settings.kafka.sasl_password is not None
    assert settings.kafka.sasl_password.get_secret_value() == secret
    shown = redacted(settings)
    assert shown["kafka"]["sasl_username"] == "worker"
    assert shown["kafka"]["sasl_password"] not in (None, secret)
    for text in (orjson.dumps(shown).decode(), repr(settings), str(settings)):
        assert secret not in text


def test_oauthbearer_needs_no_password(tmp_path: Path) -> None:
    toml = MINIMAL + "[kafka]\nsecurity_protocol = 'SASL_SSL'\nsasl_mechanism = 'OAUTHBEARER'\n"
    settings = load_settings(write(tmp_path, toml), environ={})
    assert settings.kafka.sasl_password is None


def test_redacted_round_trips_everything_but_secrets(tmp_path: Path) -> None:
    settings = load_settings(EXAMPLE, environ={})
    shown = redacted(settings)
    assert Settings.model_validate(shown) == settings


def test_attribution_path_and_constant_are_exclusive() -> None:
    environ = {
        "PW_PERSONALIZE__TRACKING_ID": "t",
        "PW_MAPPING__METRIC_ATTRIBUTION_SOURCE": "source",
        "PW_MAPPING__METRIC_ATTRIBUTION_SOURCE_VALUE": "email",
    }
    assert "not both" in error_of(None, environ)


@pytest.mark.parametrize("path", ["ctx.user_id", "session_id", "a.b.event_type", "TIMESTAMP", "impression"])
def test_properties_may_not_use_names_personalize_reserves(path: str) -> None:
    with pytest.raises(ConfigError, match=r"mapping\.properties: .*reserves"):
        load_settings(None, {"PW_PERSONALIZE__TRACKING_ID": "t", "PW_MAPPING__PROPERTIES": path})


@pytest.mark.parametrize("path", ["", "ctx.", ".page", "a..b"])
def test_properties_must_be_dotted_paths_without_empty_names(path: str, tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text(f'[personalize]\ntracking_id = "t"\n[mapping]\nproperties = ["ctx.a", "{path}"]\n')
    message = error_of(config)
    assert "mapping.properties" in message and "empty name" in message, message


def test_proxies_from_toml_and_environment_stay_masked(tmp_path: Path) -> None:
    text = MINIMAL + 'proxies = { https = "http://user:Pa55word@proxy.corp:3128" }\n'
    settings = load_settings(write(tmp_path, text), environ={})
    proxies = settings.personalize.proxies
    assert proxies is not None and proxies["https"].get_secret_value() == "http://user:Pa55word@proxy.corp:3128"
    assert "Pa55word" not in orjson.dumps(redacted(settings)).decode()
    # An optional table comes from the environment as JSON too; {} (never a proxy) is kept apart from unset.
    environ = {"PW_PERSONALIZE__TRACKING_ID": "t", "PW_PERSONALIZE__PROXIES": "{}"}
    assert load_settings(None, environ=environ).personalize.proxies == {}
    assert load_settings(None, environ={"PW_PERSONALIZE__TRACKING_ID": "t"}).personalize.proxies is None


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('proxies = { ftp = "http://p:1" }', "personalize.proxies.ftp.[key]: Input should be 'http' or 'https'"),
        ('proxies = { https = "socks5://u:S3cret@p:1" }', "the https proxy must be an http:// or https:// URL"),
        ('proxy_client_key = "/k.pem"', "proxy_client_key needs proxy_client_cert"),
        ('proxy_url = "http://p:1"', "personalize.proxy_url: unknown key"),
    ],
)
def test_proxy_keys_are_checked_without_echoing_the_url(tmp_path: Path, line: str, expected: str) -> None:
    message = error_of(write(tmp_path, MINIMAL + line + "\n"))
    assert expected in message
    assert "S3cret" not in message


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ('[mapping]\nformat = "avro"\n', "mapping.format = 'avro' needs schema_registry.url"),
        ('[mapping]\nformat = "xml"\n', "mapping.format"),
        ('[schema_registry]\nurl = "http://u:p@registry:8081"\n', "schema_registry.url: must not carry credentials"),
        ('[schema_registry]\nurl = "registry:8081"\n', "schema_registry.url"),
        ('[schema_registry]\nurl = "http://r"\nusername = "u"\n', "username and password go together"),
        ('[schema_registry]\nurl = "http://r"\ntimeout = 3\n', "schema_registry.timeout: unknown key"),
    ],
)
def test_schema_registry_settings_name_the_key(tmp_path: Path, toml: str, named: str) -> None:
    assert named in error_of(write(tmp_path, MINIMAL + toml))


def test_schema_registry_password_is_masked(tmp_path: Path) -> None:
    toml = '[mapping]\nformat = "protobuf"\n[schema_registry]\nurl = "https://r:8081/"\nusername = "u"\n'
    settings = load_settings(write(tmp_path, MINIMAL + toml), environ={"PW_SCHEMA_REGISTRY__PASSWORD": "s3cret"})
    assert settings.schema_registry.url == "https://r:8081"
    assert settings.schema_registry.password is not None
    assert "s3cret" not in orjson.dumps(redacted(settings)).decode()


# --- rules `run` used to meet only at start-up: now every command refuses them first ---------------------


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("PW_KAFKA__TOPICS", "clicks,bad topic", "kafka.topics: 'bad topic' is not a valid Kafka topic name"),
        ("PW_KAFKA__TOPICS", "x" * 250, "is not a valid Kafka topic name"),
        ("PW_DEAD_LETTER__TOPIC", "dlq/1", "dead_letter.topic: 'dlq/1' is not a valid Kafka topic name"),
        ("PW_KAFKA__BOOTSTRAP_SERVERS", "broker:abc", "kafka.bootstrap_servers: 'broker:abc': the port must be"),
        ("PW_KAFKA__BOOTSTRAP_SERVERS", "a:9092,,b:9092", "kafka.bootstrap_servers: '' is not host:port"),
        ("PW_KAFKA__BOOTSTRAP_SERVERS", "a:99999", "the port must be a number from 1 to 65535"),
        ("PW_KAFKA__GROUP_ID", "", "kafka.group_id"),
        ("PW_KAFKA__AWS_REGION", "us east 1", "kafka.aws_region: 'us east 1' is not a region name"),
        ("PW_PERSONALIZE__REGION", "-us-east-1", "personalize.region: '-us-east-1' is not a region name"),
        ("PW_PERSONALIZE__ENDPOINT_URL", "localhost:8787", "personalize.endpoint_url: 'localhost:8787' is not an"),
        ("PW_PERSONALIZE__ENDPOINT_URL", "ftp://h", "personalize.endpoint_url: 'ftp://h' is not an http(s) URL"),
        ("PW_MAPPING__PROPERTIES", "a.page_category,b.pageCategory", "both become property 'pageCategory'"),
    ],
)
def test_values_run_would_refuse_at_start_up_are_config_errors(key: str, value: str, says: str) -> None:
    assert says in error_of(None, {"PW_PERSONALIZE__TRACKING_ID": "t", key: value})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("PW_KAFKA__BOOTSTRAP_SERVERS", "b-1.msk.example.com:9098, b-2.msk.example.com:9098"),
        ("PW_KAFKA__BOOTSTRAP_SERVERS", "localhost"),
        ("PW_KAFKA__BOOTSTRAP_SERVERS", "[::1]:9092,::1"),
        ("PW_KAFKA__TOPICS", "clicks.v1,_internal-2"),
        ("PW_PERSONALIZE__ENDPOINT_URL", "https://personalize-events.eu-west-1.amazonaws.com"),
        ("PW_PERSONALIZE__REGION", "eu-west-1"),
    ],
)
def test_usual_values_pass(key: str, value: str) -> None:
    load_settings(None, {"PW_PERSONALIZE__TRACKING_ID": "t", key: value})
