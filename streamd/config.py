"""Configuration: a tree of frozen dataclasses loaded from TOML, with ``--set`` overrides.

Every problem (unknown key, wrong type, out-of-range value, unreadable file) raises
``ConfigError`` with one line naming the key; the CLI turns it into exit code 78.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamd.signal.features import FeatureParams, mel_params
from streamd.audio.frames import STREAM_ID
from streamd.signal.vad import VAD_FRAME_MS, VadParams

EX_CONFIG = 78


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


@dataclass(frozen=True)
class SourceConfig:
    spec: str = "mic"
    pace: str = "realtime"
    mic_rate: int = 0  # 0: try 16 kHz, then the device's default rate (resampled)


def _params_of(cfg: FeatureParams) -> FeatureParams:
    names = {f.name for f in dataclasses.fields(FeatureParams)}
    return FeatureParams(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in names})


@dataclass(frozen=True)
class FeatureConfig(FeatureParams):
    """The MFCC front end (digit model) and the ring buffers' length."""

    ring_seconds: float = 30.0

    def params(self) -> FeatureParams:
        return _params_of(self)


_MEL = mel_params()


@dataclass(frozen=True)
class MelConfig(FeatureParams):
    """The mel power front end (speaker encoder)."""

    kind: str = _MEL.kind
    numcep: int = _MEL.numcep
    nfilt: int = _MEL.nfilt
    nfft: int = _MEL.nfft
    lowfreq: float = _MEL.lowfreq
    highfreq: float = _MEL.highfreq
    preemph: float = _MEL.preemph
    ceplifter: int = _MEL.ceplifter
    window: str = _MEL.window

    def params(self) -> FeatureParams:
        return _params_of(self)


@dataclass(frozen=True)
class ModelsConfig:
    dir: str = "models"
    speaker: str = "speaker.card.json"
    digits: str = "digits.card.json"
    digits_fusion: str = "digits.fusion.json"  # "" or missing file: models.digits alone
    words: str = "words.card.json"  # the word embedding for vocabularies taught at run time; "" turns them off
    provider: str = "auto"
    threads: int = 1
    workers: int = 2
    early_finals: bool = True
    bucket_frames: int = 8
    batch_wait_ms: float = 2.0
    max_batch: int = 64
    max_latency_ms: float = 500.0  # latency budget: optional work is shed to keep to it; 0: never shed


@dataclass(frozen=True)
class IdentityConfig:
    far: float = 0.01
    verify_far: float = 0.001  # challenge-response: a stranger claiming a name passes this often
    score: str = "auto"
    threshold: float = 0.8
    enroll_min_seconds: float = 3.0
    enroll_max_clipped: float = 0.01
    enroll_min_dbfs: float = -50.0
    enroll_min_consistency: float = 0.6
    enroll_duplicate_score: float = 0.9
    recent_utterances: int = 50
    keep_recent_audio: bool = False  # the recent utterances' audio, in memory, for playback (recent_audio)
    partial_every_s: float = 1.5
    cluster_unknown: bool = True
    cluster_far: float = 0.01
    cluster_min_seconds: float = 1.3
    cluster_max: int = 200
    cluster_keep: int = 20


@dataclass(frozen=True)
class ControlConfig:
    endpoint: str = ""
    curve_secret_key: str = ""  # daemon: its secret certificate (NAME.key_secret)
    curve_clients: str = ""  # daemon: folder of the authorised clients' public certificates
    curve_client_key: str = ""  # clients: their secret certificate
    curve_server_key: str = ""  # clients: the daemon's public certificate (NAME.key)


@dataclass(frozen=True)
class DigitsConfig:
    model: str = "auto"  # auto | fused | cnn | rnn (see docs/models.md)
    min_confidence: float = -1.0  # below 0: the value chosen on validation speakers
    cascade: bool = True  # fused: the costly members only when the others are unsure (fusion card's cascade)
    # Outside challenges, only utterances with more speech than this are searched for a digit
    # string (the search scores up to 80 candidate pieces); 0: only a challenge's answer is.
    strings_min_s: float = 0.0


@dataclass(frozen=True)
class EventsConfig:
    endpoint: str = "tcp://127.0.0.1:5556"
    hwm: int = 1000
    jsonl: str = ""
    nats: str = ""  # nats://HOST:PORT[,nats://...]: every event also to streamd.<type>.<stream>
    nats_jetstream: str = ""  # a JetStream stream name: events persisted there ("" = core NATS only)
    nats_buffer: int = 10000  # events held while NATS is away; beyond it the oldest are dropped, counted


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9108"


@dataclass(frozen=True)
class NetworkConfig:
    listen: str = ""
    accept_any: bool = True
    max_streams: int = 1000
    gap_fill_ms: float = 1000.0
    idle_ms: float = 1000.0


@dataclass(frozen=True)
class ConsoleConfig:
    """``streamd console``, the web console (docs/console.md); the daemon reads none of it."""

    listen: str = "127.0.0.1:8090"
    token: str = ""  # required beyond loopback; a token_file keeps it out of the config
    token_file: str = ""
    tls_cert: str = ""  # PEM files: the console serves HTTPS
    tls_key: str = ""
    plain_http: bool = False  # beyond loopback without TLS: only with this said explicitly


@dataclass(frozen=True)
class StreamConfig:
    """One ``[[streams]]`` entry."""

    id: str = ""
    source: str = ""
    pace: str = ""  # "" = source.pace




@dataclass(frozen=True)
class StateConfig:
    dir: str = ""
    gallery: str = ""  # "" = gallery.sqlite3 in dir; "postgresql://..." = a gallery shared by nodes


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"


@dataclass(frozen=True)
class NodeConfig:
    id: str = ""  # this daemon's name among several; "" = the host name


@dataclass(frozen=True)
class Config:
    source: SourceConfig = field(default_factory=SourceConfig)
    vad: VadParams = field(default_factory=VadParams)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    mel: MelConfig = field(default_factory=MelConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    digits: DigitsConfig = field(default_factory=DigitsConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    state: StateConfig = field(default_factory=StateConfig)
    log: LogConfig = field(default_factory=LogConfig)
    node: NodeConfig = field(default_factory=NodeConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    streams: tuple[StreamConfig, ...] = ()
    base_dir: Path = field(default=Path("."), compare=False)

    def path(self, value: str) -> Path:
        """A path from the config, relative ones taken from the config file's folder."""
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else self.base_dir / p

    def feature_params(self, kind: str) -> FeatureParams:
        """The configured front end of a kind (``mfcc`` or ``melpower``)."""
        return self.mel.params() if kind == "melpower" else self.features.params()

    def state_dir(self) -> Path:
        if self.state.dir:
            return self.path(self.state.dir)
        if os.environ.get("STATE_DIRECTORY"):  # set by systemd's StateDirectory=
            return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
        xdg = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
        return Path(xdg) / "streamd"

    def client_state_dir(self) -> Path:
        """The state directory a client (``streamd speakers``) looks in: ``state_dir()``, except
        that when that is only the per-user default and does not exist while the service's
        (the unit's StateDirectory=) does, the service's."""
        default = self.state_dir()
        if self.state.dir or os.environ.get("STATE_DIRECTORY") or os.path.lexists(default):
            return default
        service = unit_directories()[0]
        return service if os.path.lexists(service) else default


# What a SIGHUP reload does with each key (docs/operations.md, "Lifecycle"): RELOAD keys take
# effect in the running daemon; RESTART keys are named in a warning and keep their running
# value until streamd restarts. A section named alone covers every key of it, present and
# future (a key added there needs a restart until someone makes it reloadable); the sections
# where some keys reload list each key. tests/test_config.py checks that every key is covered.
RELOAD, RESTART = "reload", "restart"
ON_RELOAD: dict[str, str] = {
    "source": RESTART,  # the audio sources are opened once
    "vad": RESTART,
    "features": RESTART,  # the models were checked against these front ends at load
    "mel": RESTART,
    "models": RESTART,
    "control": RESTART,  # sockets and keys
    "events": RESTART,
    "metrics": RESTART,
    "state": RESTART,  # the gallery is open
    "node": RESTART,
    "network": RESTART,
    "streams": RESTART,
    "identity.far": RELOAD,
    "identity.verify_far": RELOAD,
    "identity.score": RELOAD,
    "identity.threshold": RELOAD,
    "identity.enroll_min_seconds": RELOAD,
    "identity.enroll_max_clipped": RELOAD,
    "identity.enroll_min_dbfs": RELOAD,
    "identity.enroll_min_consistency": RELOAD,
    "identity.enroll_duplicate_score": RELOAD,
    "identity.recent_utterances": RELOAD,  # each stream's list keeps its newest utterances
    "identity.keep_recent_audio": RELOAD,  # off: the audio kept is dropped at once; on: kept from the next utterance
    "identity.partial_every_s": RELOAD,
    "identity.cluster_unknown": RELOAD,
    "identity.cluster_far": RELOAD,
    "identity.cluster_min_seconds": RELOAD,
    "identity.cluster_max": RELOAD,
    "identity.cluster_keep": RELOAD,
    "digits.model": RESTART,  # which models are loaded
    "digits.min_confidence": RELOAD,
    "digits.cascade": RESTART,  # its stages are read from the fusion card with the models
    "digits.strings_min_s": RESTART,  # read by each stream's pipeline when it starts
    "log.level": RELOAD,
    "console": RELOAD,  # read by `streamd console` alone: nothing in the daemon to restart
}


def config_keys() -> list[str]:
    """Every key of the config, dotted (``[[streams]]`` as the one key ``streams``)."""
    keys = []
    for f in dataclasses.fields(Config):
        if f.name == "base_dir":
            continue
        if f.name == "streams":
            keys.append("streams")
            continue
        keys += [f"{f.name}.{k.name}" for k in dataclasses.fields(f.default_factory())]  # type: ignore[misc]
    return keys


def on_reload(key: str) -> str:
    """RELOAD or RESTART for a dotted key (``ON_RELOAD``); KeyError for a key it does not cover."""
    return ON_RELOAD[key] if key in ON_RELOAD else ON_RELOAD[key.partition(".")[0]]


def reload_plan(running: Config, new: Config) -> tuple[Config, list[str]]:
    """What a reload to ``new`` does: the config that then runs (``new``'s value for every
    RELOAD key, ``running``'s for the others) and the RESTART keys whose value changed, which
    a warning names. Each later reload names them again until streamd restarts."""
    restart, applied = [], {}
    for key in config_keys():
        section, _, name = key.partition(".")
        old_value = getattr(running, section) if not name else getattr(getattr(running, section), name)
        new_value = getattr(new, section) if not name else getattr(getattr(new, section), name)
        if old_value == new_value:
            continue
        if on_reload(key) == RESTART:
            restart.append(key)
        else:
            applied.setdefault(section, {})[name] = new_value
    sections = {name: dataclasses.replace(getattr(running, name), **values) for name, values in applied.items()}
    return dataclasses.replace(running, **sections), restart


# The system's root, where the installed unit and its directories are found (tests move it).
SYSTEMD_ROOT = Path("/")
UNIT_NAME = "streamd.service"
UNIT_DIRS = ("etc/systemd/system", "usr/local/lib/systemd/system", "usr/lib/systemd/system", "lib/systemd/system")
SHIPPED_UNIT = Path(__file__).resolve().parent.parent / "systemd" / UNIT_NAME


def unit_directories() -> tuple[Path, Path]:
    """The service's state and runtime directories as its unit defines them (StateDirectory=
    under /var/lib, RuntimeDirectory= under /run): the installed unit's, else the shipped one's."""
    dirs = {"StateDirectory": "streamd", "RuntimeDirectory": "streamd"}
    for unit in [SYSTEMD_ROOT / d / UNIT_NAME for d in UNIT_DIRS] + [SHIPPED_UNIT]:
        try:
            text = unit.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.strip().partition("=")
            if key in dirs and value.split():
                dirs[key] = value.split()[0].split(":")[0]  # the first folder (NAME[:ALIAS])
        break
    return SYSTEMD_ROOT / "var/lib" / dirs["StateDirectory"], SYSTEMD_ROOT / "run" / dirs["RuntimeDirectory"]


# Allowed ranges (inclusive) and choices, by dotted key.
RANGES: dict[str, tuple[float, float]] = {
    "source.mic_rate": (0, 192000),
    "vad.aggressiveness": (0, 3),
    "vad.onset_ms": (10, 2000),
    "vad.onset_ratio": (0.0, 1.0),
    "vad.preroll_ms": (0, 2000),
    "vad.hangover_ms": (10, 5000),
    "vad.tail_ms": (0, 5000),
    "vad.min_utterance_ms": (0, 10000),
    "vad.max_utterance_ms": (500, 60000),
    "vad.max_gain_db": (0.0, 40.0),
    "vad.target_dbfs": (-60.0, 0.0),
    "vad.noise_ceiling_dbfs": (-100.0, -20.0),
    "vad.min_snr_db": (0.0, 30.0),
    "vad.quiet_end_ms": (0, 5000),
    "vad.quiet_db": (0.0, 30.0),
    "features.sample_rate": (16000, 16000),
    "features.winlen": (0.005, 0.1),
    "features.winstep": (0.005, 0.1),
    "features.numcep": (1, 64),
    "features.nfilt": (1, 128),
    "features.nfft": (64, 4096),
    "features.lowfreq": (0, 8000),
    "features.highfreq": (1, 8000),
    "features.preemph": (0.0, 1.0),
    "features.ceplifter": (0, 100),
    "features.ring_seconds": (1, 600),
    "mel.sample_rate": (16000, 16000),
    "mel.winlen": (0.005, 0.1),
    "mel.winstep": (0.005, 0.1),
    "mel.numcep": (1, 128),
    "mel.nfilt": (1, 128),
    "mel.nfft": (64, 4096),
    "mel.lowfreq": (0, 8000),
    "mel.highfreq": (1, 8000),
    "mel.preemph": (0.0, 1.0),
    "mel.ceplifter": (0, 100),
    "models.threads": (1, 64),
    "models.workers": (1, 64),
    "models.bucket_frames": (0, 1000),
    "models.batch_wait_ms": (0.0, 100.0),
    "models.max_batch": (1, 4096),
    "models.max_latency_ms": (0.0, 600000.0),
    "network.max_streams": (1, 100000),
    "network.gap_fill_ms": (0.0, 60000.0),
    "network.idle_ms": (100.0, 60000.0),
    "identity.far": (1e-6, 0.5),
    "identity.verify_far": (1e-6, 0.5),
    "identity.threshold": (-1.0, 1.0),
    "identity.enroll_min_seconds": (0.0, 600.0),
    "identity.enroll_max_clipped": (0.0, 1.0),
    "identity.enroll_min_dbfs": (-120.0, 0.0),
    "identity.enroll_min_consistency": (-1.0, 1.0),
    "identity.enroll_duplicate_score": (-1.0, 1.0),
    "identity.recent_utterances": (1, 10000),
    "identity.partial_every_s": (0.0, 60.0),
    "identity.cluster_far": (1e-6, 0.5),
    "identity.cluster_min_seconds": (0.0, 60.0),
    "identity.cluster_max": (1, 100000),
    "identity.cluster_keep": (1, 1000),
    "digits.min_confidence": (-1.0, 1.0),
    "digits.strings_min_s": (0.0, 60.0),
    "events.hwm": (1, 1_000_000),
    "events.nats_buffer": (1, 10_000_000),
}
CHOICES: dict[str, tuple[Any, ...]] = {
    "source.pace": ("realtime", "fast"),
    "vad.frame_ms": VAD_FRAME_MS,
    "features.kind": ("mfcc",),
    "features.window": ("hamming", "hann", "rect"),
    "mel.kind": ("melpower",),
    "mel.window": ("hamming", "hann", "rect"),
    "models.provider": ("auto", "cpu", "cuda"),
    "identity.score": ("auto", "as-norm"),
    "streams.pace": ("", "realtime", "fast"),
    "log.level": ("debug", "info", "warning", "error"),
}


# Values checked by form; what they name is checked where it is loaded.
PATTERNS: dict[str, tuple[str, str]] = {
    # Any model the fusion card lists: a family, with -sN for a seed other than 0.
    "digits.model": (r"auto|fused|[a-z][a-z0-9]*(-[a-z][a-z0-9]*)*(-s[0-9]+)?",
                     "auto, fused or a digit model's name (cnn, rnn, ge2e, cnn-s1, rnn-s1, ...)"),
}


def _check_value(key: str, value: Any, default: Any) -> Any:
    kind = type(default)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{key}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    if key in RANGES:
        lo, hi = RANGES[key]
        if not lo <= value <= hi:
            raise ConfigError(f"{key}: {value!r} is out of range [{lo}, {hi}]")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, CHOICES[key]))}")
    if key in PATTERNS and not re.fullmatch(PATTERNS[key][0], value):
        raise ConfigError(f"{key}: {value!r} is not {PATTERNS[key][1]}")
    return value


def _build_section(name: str, cls: type, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: expected a table, got {type(values).__name__}")
    defaults = cls()
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"{name}.{key}: unknown key")
    checked = {k: _check_value(f"{name}.{k}", v, getattr(defaults, k)) for k, v in values.items()}
    return cls(**checked)


def build(tree: dict[str, Any], base_dir: Path = Path(".")) -> Config:
    sections = {f.name: f for f in dataclasses.fields(Config) if f.name not in ("base_dir", "streams")}
    for name in tree:
        if name not in sections and name != "streams":
            raise ConfigError(f"{name}: unknown section")
    built = {
        name: _build_section(name, f.default_factory().__class__, tree.get(name, {}))  # type: ignore[misc]
        for name, f in sections.items()
    }
    cfg = Config(**built, streams=_build_streams(tree.get("streams", [])), base_dir=base_dir)
    _check_consistency(cfg)
    _check_exposure(cfg)
    _check_console(cfg.console)
    _check_nodes(cfg)
    return cfg


def _build_streams(entries: Any) -> tuple[StreamConfig, ...]:
    """``[[streams]]``: each needs a unique id (letters, digits, _ and -) and a source."""
    if not isinstance(entries, list):
        raise ConfigError("streams: expected an array of tables ([[streams]])")
    streams = tuple(_build_section("streams", StreamConfig, e) for e in entries)
    seen: set[str] = set()
    for i, st in enumerate(streams):
        if not STREAM_ID.match(st.id):
            raise ConfigError(f"streams[{i}].id: {st.id!r} must be 1-64 letters, digits, '_' or '-'")
        if st.id in seen:
            raise ConfigError(f"streams[{i}].id: {st.id!r} is used twice")
        if not st.source:
            raise ConfigError(f"streams[{i}].source: missing (mic[:DEVICE], file:PATH, stdin or net)")
        seen.add(st.id)
    return streams


def _check_consistency(cfg: Config) -> None:
    for name in ("features", "mel"):
        f = getattr(cfg, name)
        if f.highfreq <= f.lowfreq:
            raise ConfigError(f"{name}.highfreq: must be above {name}.lowfreq")
        if f.nfft < f.frame_len:
            raise ConfigError(f"{name}.nfft: must be at least the frame length ({f.frame_len})")
    if cfg.vad.tail_ms > cfg.vad.hangover_ms:
        raise ConfigError("vad.tail_ms: must not exceed vad.hangover_ms")
    ring_ms = cfg.features.ring_seconds * 1000
    if ring_ms < cfg.vad.max_utterance_ms + cfg.vad.preroll_ms + cfg.vad.onset_ms + cfg.vad.hangover_ms:
        raise ConfigError("features.ring_seconds: too small for vad.max_utterance_ms plus pre-roll and hangover")
    if cfg.vad.min_utterance_ms >= cfg.vad.max_utterance_ms:
        raise ConfigError("vad.min_utterance_ms: must be below vad.max_utterance_ms")


ENDPOINT_SCHEMES = ("ipc://", "tcp://")  # the transports streamd's sockets take


def local_endpoint(endpoint: str) -> bool:
    """Whether a ZeroMQ endpoint stays on this machine: ipc://, or tcp:// on a loopback address."""
    import ipaddress

    if endpoint.startswith("ipc://"):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://"):].rpartition(":")[0]
    if ";" in host:  # tcp://SOURCE;HOST:PORT (connect) names the peer last
        host = host.rpartition(";")[2]
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a host name


def _check_exposure(cfg: Config) -> None:
    """Nothing is reachable beyond loopback without CurveZMQ (docs/control.md)."""
    c = cfg.control
    if c.endpoint and not c.endpoint.startswith(ENDPOINT_SCHEMES):
        raise ConfigError(f"control.endpoint: {c.endpoint!r} is not an ipc:// or tcp:// endpoint")
    for a, b in (("curve_secret_key", "curve_clients"), ("curve_client_key", "curve_server_key")):
        if bool(getattr(c, a)) != bool(getattr(c, b)):
            given, missing = (a, b) if getattr(c, a) else (b, a)
            raise ConfigError(f"control.{missing}: must be set together with control.{given}")
    if c.endpoint and not local_endpoint(c.endpoint) and not (c.curve_secret_key or c.curve_client_key):
        raise ConfigError(f"control.endpoint: {c.endpoint} is reachable beyond this machine; remote control "
                          "needs CurveZMQ keys (control.curve_secret_key and control.curve_clients)")
    from streamd import keys

    checks = (("curve_secret_key", keys.load_secret), ("curve_clients", keys.load_clients),
              ("curve_client_key", keys.load_secret), ("curve_server_key", keys.load_public))
    for name, loader in checks:
        if getattr(c, name):
            try:
                loader(cfg.path(getattr(c, name)))
            except keys.KeyFileError as exc:
                raise ConfigError(f"control.{name}: {exc}") from None
    e = cfg.events.endpoint
    if not local_endpoint(e):
        raise ConfigError(f"events.endpoint: {e} is not loopback or ipc://; events are not encrypted, "
                          "so they stay on this machine (forward with ssh -L, docs/control.md)")
    n = cfg.network.listen
    if n and not n.startswith(ENDPOINT_SCHEMES):
        raise ConfigError(f"network.listen: {n!r} is not an ipc:// or tcp:// endpoint")
    if n and not local_endpoint(n) and not c.curve_secret_key:
        raise ConfigError(f"network.listen: {n} is reachable beyond this machine; set control.curve_secret_key "
                          "and control.curve_clients so only known devices may send audio")


def _check_nodes(cfg: Config) -> None:
    """Forms only: whether the database or NATS answers is found when the daemon connects."""
    g = cfg.state.gallery
    if g and not g.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"state.gallery: {g!r} is not \"\" (SQLite in state.dir) or a postgresql:// URL")
    for url in filter(None, (u.strip() for u in cfg.events.nats.split(","))):
        if not url.startswith(("nats://", "tls://")):
            raise ConfigError(f"events.nats: {url!r} is not a nats:// or tls:// URL")
    if cfg.events.nats_jetstream and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", cfg.events.nats_jetstream):
        raise ConfigError(f"events.nats_jetstream: {cfg.events.nats_jetstream!r} is not a stream name "
                          "(letters, digits, _ and -)")
    if cfg.node.id and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", cfg.node.id):
        raise ConfigError(f"node.id: {cfg.node.id!r} may hold only letters, digits, _ and - (it is part of "
                          "NATS subjects and metric labels)")


def host_port(text: str, key: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as a host and a port, else a ConfigError."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{key}: {text!r} is not HOST:PORT (e.g. 127.0.0.1:8090)")
    return host, int(port)


def _check_console(c: ConsoleConfig) -> None:
    """Forms only: whether a listen address beyond loopback has its token and TLS is checked
    when the console starts (``--listen`` may change it, and the daemon never listens there)."""
    host_port(c.listen, "console.listen")
    if c.token and c.token_file:
        raise ConfigError("console.token_file: set console.token or console.token_file, not both")
    if bool(c.tls_cert) != bool(c.tls_key):
        given, missing = ("tls_cert", "tls_key") if c.tls_cert else ("tls_key", "tls_cert")
        raise ConfigError(f"console.{missing}: must be set together with console.{given}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=VALUE`` with VALUE in TOML syntax."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected section.key=VALUE")
    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"{key}: expected section.key")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        raise ConfigError(f"{key}: value {raw!r} is not valid TOML (strings need quotes)") from None
    return parts, value


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def load(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Load ``path`` (or defaults when None), apply ``--set`` overrides, validate."""
    tree: dict[str, Any] = {}
    base = Path(".")
    if path is not None:
        path = Path(path)
        tree = read_toml(path)
        base = path.resolve().parent
    for text in overrides:
        (section, key), value = parse_override(text)
        table = tree.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{section}: expected a table")
        table[key] = value
    models = tree.setdefault("models", {})
    if isinstance(models, dict) and "dir" not in models:
        # Not set by a config file nor --set: the models streamd was installed with, wherever
        # the command runs (not a models/ folder of the current one).
        models["dir"] = str(installed_models())
    return build(tree, base)


PACKAGE_DIR = Path(__file__).resolve().parent


def installed_models() -> Path:
    """The models streamd was installed with: the checkout's ``models/`` for a source or
    editable install, else ``<prefix>/share/streamd/models`` (where a wheel puts them)."""
    shared = Path(sys.prefix) / "share" / "streamd" / "models"
    for folder in (PACKAGE_DIR.parent / "models", shared):
        if any(folder.glob("*.card.json")):
            return folder
    return shared


def default_config_path() -> Path | None:
    """``./config.toml`` if present, so commands run in the repo pick up its config."""
    p = Path("config.toml")
    return p if p.is_file() else None
